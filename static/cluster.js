// The Ray cluster in the page's header (GET /health's `cluster`, present only with the Ray
// executor): its nodes and free GPUs, or why it cannot be used. Pure apart from the mount.

import { $, setText, show } from "./dom.js";

/**
 * The header's line and its tooltip for a /health answer: null with the local executor;
 * {text, title, tone} otherwise ("ok" when usable, "warn" when tasks wait for it).
 */
export function clusterView(health) {
  const cluster = health?.cluster;
  if (!cluster) return null;
  if (!cluster.reachable || cluster.problem) {
    return {
      text: cluster.reachable ? "Ray cluster: not usable" : "Ray cluster unreachable",
      title: cluster.problem || `no answer from ${cluster.address}`,
      tone: "warn",
    };
  }
  const alive = (cluster.nodes || []).filter((n) => n.alive);
  const nodes = `${alive.length} ${alive.length === 1 ? "node" : "nodes"}`;
  const free = Math.floor(cluster.gpus_free);
  const total = Math.floor(cluster.gpus_total);
  const gpus = `${free} of ${total} ${total === 1 ? "GPU" : "GPUs"} free`;
  const lines = alive.map(
    (n) =>
      `${n.hostname || n.ip} (${n.ip}${n.is_head ? ", head" : ""}): ` +
      `${Math.floor(n.gpus_free)} of ${Math.floor(n.gpus_total)} GPUs free`,
  );
  return {
    text: `Ray cluster · ${nodes} · ${gpus}`,
    title: [`Ray ${cluster.ray_version || "?"} at ${cluster.address}`, ...lines].join("\n"),
    tone: "ok",
  };
}

/** Keep the header's cluster line in step with the store's health. */
export function mountCluster(doc, ctx) {
  const element = $("#cluster", doc);
  ctx.store.subscribe((change, state) => {
    if (change.type !== "health") return;
    const view = clusterView(state.health);
    show(element, view != null);
    if (!view) return;
    setText(element, view.text);
    element.title = view.title;
    element.dataset.tone = view.tone;
  });
}
