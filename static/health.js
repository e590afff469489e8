// The server's health (GET /health): kept in the store, and the banner that says what this
// server cannot do (no preprocessing, no training, a nearly full disk).

import { $, setText, show } from "./dom.js";
import * as fmt from "./format.js";

const LOW_DISK_BYTES = 2 * 1024 ** 3;

/** The banner's sentences for a /health answer (none when all is well). */
export function healthNotes(health) {
  const notes = [];
  if (!health.preprocessing.available) {
    notes.push(`Preprocessing cannot run on this server: ${health.preprocessing.detail}`);
  }
  if (!health.training.available) {
    notes.push(
      `Training is not available on this server (${health.training.detail}). Videos are ` +
        "still turned into frames and camera positions you can look at and download.",
    );
  }
  if (health.disk_free_bytes < LOW_DISK_BYTES) {
    notes.push(`The server's disk is almost full: ${fmt.bytes(health.disk_free_bytes)} free.`);
  }
  return notes;
}

/** Fetch /health into the store; resolves with the answer. */
export async function loadHealth(ctx) {
  const health = await ctx.api.get("health");
  ctx.store.setHealth(health);
  return health;
}

/** Mount the health banner and the Token button's visibility on the store's health. */
export function mountHealth(doc, ctx) {
  const banner = $("#health-banner", doc);
  ctx.store.subscribe((change, state) => {
    if (change.type !== "health") return;
    const health = state.health;
    show($("#token-button", doc), health.auth_required || Boolean(ctx.api.getToken()));
    const notes = healthNotes(health);
    setText(banner, notes.join(" "));
    banner.dataset.tone = health.preprocessing.available ? "info" : "warn";
    show(banner, notes.length > 0);
  });
}
