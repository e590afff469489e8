// Small DOM helpers shared by the views: building elements, setting text and visibility
// only when they change, progress bars, and the polite announcer and toasts.

/** The first element matching `selector` under `root`. */
export const $ = (selector, root = document) => root.querySelector(selector);

/** Build an element: h("a", {class: "x", href: "#", onclick: f}, "text", child). */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === "class") element.className = value;
    else if (key === "text") element.textContent = value;
    else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  element.append(...children.flat().filter((c) => c != null && c !== false));
  return element;
}

export function setText(element, text) {
  const value = text == null ? "" : String(text);
  if (element.textContent !== value) element.textContent = value;
}

export function show(element, visible) {
  if (element.hidden === visible) element.hidden = !visible;
}

/** Fill a bar made by `bar()` (or the upload's) to `percent`, in `tone` when given. */
export function setBar(element, percent, tone) {
  const value = Math.max(0, Math.min(100, Number.isFinite(percent) ? percent : 0));
  const fill = element.firstElementChild;
  const width = `${value.toFixed(1)}%`;
  if (fill.style.width !== width) fill.style.width = width;
  if (tone !== undefined && element.dataset.tone !== tone) element.dataset.tone = tone;
  if (element.getAttribute("role") === "progressbar") {
    element.setAttribute("aria-valuenow", String(Math.round(value)));
  }
}

/** A progress bar; with a label it is a progressbar for assistive technology. */
export function bar(label) {
  const props = label
    ? {
        class: "bar",
        role: "progressbar",
        "aria-label": label,
        "aria-valuemin": "0",
        "aria-valuemax": "100",
        "aria-valuenow": "0",
      }
    : { class: "bar", "aria-hidden": "true" };
  return h("span", props, h("span", { class: "bar-fill" }));
}

/** Scroll `element` into view when the layout is a single column (phones). */
export function scrollIntoViewIfStacked(element) {
  if (!window.matchMedia("(max-width: 959px)").matches) return;
  const reduced = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  element.scrollIntoView({ behavior: reduced ? "auto" : "smooth", block: "start" });
}

/** `announce(text)` for screen readers (politely, once) and `toast(text, tone, ms)`. */
export function createNotifier(announcer, toasts) {
  let timer = 0;
  return {
    announce(text) {
      clearTimeout(timer);
      announcer.textContent = "";
      timer = setTimeout(() => {
        announcer.textContent = text;
      }, 60);
    },
    toast(text, tone = "info", ms = 6000) {
      const item = h("div", { class: `toast ${tone}` }, text);
      toasts.append(item);
      setTimeout(() => item.remove(), ms);
    },
  };
}
