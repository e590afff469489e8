// The detail view's results summary (the preprocessing verdict and the training numbers) and
// its "Task details" list, painted only when what they show changed.

import { h, show } from "./dom.js";
import { factRows, preprocessingSummary, qualityView, trainingStats } from "./task-summary.js";

function stats(rows) {
  return h(
    "dl",
    { class: "stats" },
    rows.map(([label, value, note]) =>
      h(
        "div",
        { class: "stat" },
        h("dt", {}, label),
        h(
          "dd",
          {},
          h("span", { class: "stat-value" }, value),
          note ? h("span", { class: "stat-note" }, note) : null,
        ),
      ),
    ),
  );
}

/** Paint the summary of `task`'s results into `container` (hidden when there are none). */
export function paintSummary(container, task) {
  const pre = task.metadata?.preprocessing;
  const train = task.metadata?.training;
  const key = JSON.stringify([pre, train, task.status]);
  if (container.dataset.key === key) return;
  container.dataset.key = key;
  const parts = [];
  const summary = preprocessingSummary(pre);
  if (summary) {
    parts.push(
      h("h3", {}, "Preprocessing"),
      h("p", { class: "summary-text" }, summary.sentence, " ", summary.verdict),
      stats(summary.stats),
    );
  }
  const training = trainingStats(train);
  if (training) parts.push(h("h3", {}, "Training"), stats(training));
  const quality = qualityView(train?.quality);
  if (quality) {
    parts.push(
      h("h3", {}, "Quality"),
      h(
        "p",
        { class: "summary-text quality", "data-verdict": quality.verdict || "unrated" },
        quality.sentence,
      ),
      stats(quality.rows),
      h("p", { class: "panel-note" }, quality.scale),
    );
  }
  container.replaceChildren(...parts);
  show(container, parts.length > 0);
}

/** Paint the "Task details" list of `task` into the <dl> `container`. */
export function paintFacts(container, task) {
  const rows = factRows(task);
  const key = JSON.stringify(rows);
  if (container.dataset.key === key) return;
  container.dataset.key = key;
  container.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}
