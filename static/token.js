// The API token dialog: asked for once when the server refuses a request (however many were
// refused), checked against GET /health before it is kept; the Token button changes or
// forgets it.

import { $, setText, show } from "./dom.js";

/**
 * @param {Document} doc
 * @param {{api: object, store: object, notify: {toast: Function},
 *   loadHealth: () => Promise<object>, onLocked: () => void, onSaved: () => void}} ctx
 * @returns {{ask: (reason: string) => Promise<void>, waitForToken: () => Promise<void>}}
 */
export function mountToken(doc, ctx) {
  const { api } = ctx;
  const dialog = $("#token-dialog", doc);
  const input = $("#token-input", doc);
  const error = $("#token-error", doc);
  const forget = $("#token-forget", doc);
  const button = $("#token-button", doc);
  let waiters = [];

  const waitForToken = () => new Promise((resolve) => waiters.push(resolve));

  function ask(reason) {
    ctx.onLocked();
    const hadToken = Boolean(api.getToken());
    setText(error, hadToken ? `The saved token was refused: ${reason}` : "");
    show(error, hadToken);
    show(forget, hadToken);
    if (!dialog.open) {
      input.value = "";
      dialog.showModal();
    }
    return waitForToken();
  }

  async function save(event) {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) {
      setText(error, "Enter the token.");
      show(error, true);
      input.focus();
      return;
    }
    try {
      await api.saveToken(value); // POST /login: checks it and sets the session cookie
      await ctx.loadHealth();
    } catch (failure) {
      if (failure.status === 401) {
        api.setToken("");
        setText(error, "This token was refused. Check it and try again.");
        show(error, true);
        input.select();
        return;
      }
      if (failure.status === 403) {
        setText(error, failure.detail || "The server refused to log in.");
        show(error, true);
        return;
      }
    }
    dialog.close();
    show(button, true);
    ctx.notify.toast("Token saved in this browser.", "ok");
    const waiting = waiters;
    waiters = [];
    for (const resolve of waiting) resolve();
    ctx.onSaved();
  }

  $("#token-form", doc).addEventListener("submit", save);
  button.addEventListener("click", () => {
    setText(
      $("#token-reason", doc),
      "The token is kept in this browser and sent with every request (never in a URL).",
    );
    show(forget, Boolean(api.getToken()));
    show(error, false);
    input.value = "";
    dialog.showModal();
  });
  forget.addEventListener("click", () => {
    api.setToken("");
    dialog.close();
    ctx.notify.toast("The saved token was removed from this browser.", "info");
    location.reload();
  });
  dialog.addEventListener("cancel", (event) => {
    // Nothing works without it.
    if (!api.getToken() && ctx.store.state.health?.auth_required !== false) {
      event.preventDefault();
    }
  });
  api.hooks.unauthorized = (reason) => {
    ask(reason);
  };

  return { ask, waitForToken };
}
