// The header's Ray cluster line (static/cluster.js) from /health answers.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { clusterView } from "../../static/cluster.js";

const node = (hostname, ip, gpusFree, extra = {}) => ({
  node_id: `${hostname}-id`,
  ip,
  hostname,
  alive: true,
  is_head: false,
  gpus_total: 1,
  gpus_free: gpusFree,
  ...extra,
});

const cluster = (extra = {}) => ({
  executor: "ray",
  address: "http://head:8265",
  reachable: true,
  ray_version: "2.60.0",
  nodes: [
    node("head", "10.0.0.1", 0, { is_head: true, gpus_total: 0 }),
    node("gpu-1", "10.0.0.2", 0),
    node("gpu-2", "10.0.0.3", 1),
  ],
  gpus_total: 2,
  gpus_free: 1,
  problem: null,
  ...extra,
});

describe("the cluster line", () => {
  test("the local executor shows none", () => {
    assert.equal(clusterView({ cluster: null }), null);
    assert.equal(clusterView({}), null);
    assert.equal(clusterView(null), null);
  });

  test("nodes and free GPUs, with each node in the tooltip", () => {
    const view = clusterView({ cluster: cluster() });
    assert.equal(view.text, "Ray cluster · 3 nodes · 1 of 2 GPUs free");
    assert.equal(view.tone, "ok");
    assert.equal(
      view.title,
      [
        "Ray 2.60.0 at http://head:8265",
        "head (10.0.0.1, head): 0 of 0 GPUs free",
        "gpu-1 (10.0.0.2): 0 of 1 GPUs free",
        "gpu-2 (10.0.0.3): 1 of 1 GPUs free",
      ].join("\n"),
    );
  });

  test("dead nodes are not counted", () => {
    const nodes = [node("gpu-1", "10.0.0.2", 1), node("gpu-2", "10.0.0.3", 0, { alive: false })];
    const view = clusterView({ cluster: cluster({ nodes, gpus_total: 1, gpus_free: 1 }) });
    assert.equal(view.text, "Ray cluster · 1 node · 1 of 1 GPU free");
  });

  test("an unreachable cluster says so and why", () => {
    const problem = "the Ray cluster at http://head:8265 is unreachable: refused";
    const view = clusterView({ cluster: cluster({ reachable: false, nodes: [], problem }) });
    assert.deepEqual(view, { text: "Ray cluster unreachable", title: problem, tone: "warn" });
  });

  test("a reachable cluster with a problem (storage not shared) warns", () => {
    const problem = "storage not shared: a Ray node does not see the server's folder";
    const view = clusterView({ cluster: cluster({ problem }) });
    assert.equal(view.text, "Ray cluster: not usable");
    assert.equal(view.title, problem);
    assert.equal(view.tone, "warn");
  });
});
