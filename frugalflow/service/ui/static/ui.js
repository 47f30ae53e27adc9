// The run viewer's shared script: API calls from the pages (same origin, the cookie, and the
// CSRF header that cookie-authenticated writes need). No dependency, no build step.
"use strict";

window.frugalflow = (function () {
  const body = document.body;

  // POST JSON to the API (path under its base, e.g. "/runs/abc/cancel"); resolves to the
  // decoded answer, rejects with the API's message.
  async function post(url, payload) {
    const headers = { "Content-Type": "application/json", "Accept": "application/json" };
    headers[body.dataset.csrfHeader] = "1";
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin", headers: headers,
      body: JSON.stringify(payload === undefined ? {} : payload),
    });
    let answer = null;
    try { answer = await r.json(); } catch (e) { answer = null; }
    if (!r.ok) {
      const detail = answer && answer.detail;
      const text = detail && (detail.message || (typeof detail === "string" ? detail : null));
      throw new Error(text || ("the service answered " + r.status));
    }
    return answer;
  }

  return { post: post, api: body.dataset.api, ui: body.dataset.ui };
})();
