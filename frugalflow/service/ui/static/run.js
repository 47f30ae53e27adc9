// The run page: while the run may change, follow its events (EventSource, which reconnects
// by itself with Last-Event-ID) and swap in the server-rendered part (#live) on each; the
// cancel, resume and feedback buttons call the API. A waiting run (parked on a batch or a
// cheaper hour, maybe for hours) holds no stream open: its part is re-fetched now and then,
// and once the poller resumes it the page follows its events again.
"use strict";

(function () {
  const live = document.getElementById("live");
  if (!live) { return; }
  const message = document.getElementById("action-message");
  const KINDS = ["status", "run_started", "node_started", "attempt", "node_finished",
                 "run_finished", "message"];
  const LIVE = ["pending", "queued", "running"];
  const WAITING_POLL_MS = 20000;
  let source = null;
  let timer = null;
  let fetching = false;
  let again = false;
  // After a resume: the status the run had, until the page shows another or the resumed
  // execution finishes (the API answers before the run's row says `running`, so the page
  // must not stop following meanwhile). `since`: the row's last change before the resume
  // (server time, ms): a replayed run_finished from before it does not count.
  let leaving = null;
  let since = 0;

  function say(text, bad) {
    message.textContent = text;
    message.classList.toggle("bad", Boolean(bad));
    message.hidden = !text;
  }

  function shown() {
    const part = live.querySelector(".run-live");
    return part === null ? null : part.dataset.status;
  }

  function following() {
    const status = shown();
    if (leaving !== null && status !== leaving) { leaving = null; }
    return leaving !== null || LIVE.indexOf(status) >= 0;
  }

  function stop() {
    if (source !== null) { source.close(); source = null; }
  }

  // While the run waits (and no stream is followed), look again every WAITING_POLL_MS.
  function watchWaiting() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (shown() !== "waiting" || source !== null) { return; }
    timer = setTimeout(async function () {
      timer = null;
      await refresh();  // sets the next look while it still waits
      if (following()) { follow(); }
    }, WAITING_POLL_MS);
  }

  // Re-fetch the live part; events that arrive meanwhile cause one more fetch, not many.
  async function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      do {
        again = false;
        const r = await fetch(live.dataset.liveUrl, { credentials: "same-origin" });
        if (r.redirected) { window.location.assign(r.url); return; }  // signed out
        if (!r.ok) { say("Could not refresh the run (" + r.status + ")", true); break; }
        live.innerHTML = await r.text();
      } while (again);
    } catch (e) {
      say("Could not refresh the run: " + e.message, true);
    } finally {
      fetching = false;
    }
    if (!following()) { stop(); }
    watchWaiting();
  }

  function follow() {
    if (source !== null) { return; }
    source = new EventSource(live.dataset.eventsUrl);
    const onEvent = function () { refresh(); };
    KINDS.forEach(function (kind) { source.addEventListener(kind, onEvent); });
    source.addEventListener("run_finished", function (ev) {
      try {
        if (Date.parse(JSON.parse(ev.data).at) > since) { leaving = null; }
      } catch (e) { leaving = null; }
    });
    source.onerror = function () {
      // CLOSED: refused (signed out, gone); otherwise the browser reconnects by itself.
      if (source !== null && source.readyState === EventSource.CLOSED) {
        source = null;
        refresh();
      }
    };
  }

  async function act(path, payload, done) {
    say("");
    const before = shown();
    const part = live.querySelector(".run-live");
    const changed = part === null ? 0 : Number(part.dataset.updatedMs);
    try {
      const answer = await window.frugalflow.post(live.dataset.actionsUrl + path, payload);
      if (answer && LIVE.indexOf(answer.status) >= 0) { leaving = before; since = changed; }
      if (done) { say(done(answer)); }
    } catch (e) {
      say(e.message, true);
    }
    await refresh();
    if (following()) { follow(); }
  }

  live.addEventListener("click", function (ev) {
    const button = ev.target.closest("button[data-action]");
    if (button === null) { return; }
    if (button.dataset.action === "cancel") {
      button.disabled = true;
      act("/cancel", {}, function (a) { return "Run " + a.status + "."; });
    } else if (button.dataset.action === "feedback") {
      const good = button.dataset.good === "true";
      const node = button.dataset.node;
      act("/feedback", { good: good, node: node }, function (a) {
        return "Feedback recorded: " + a.answers + " answer(s) of " + node + " marked " +
          (good ? "good" : "bad") + ".";
      });
    }
  });

  live.addEventListener("submit", function (ev) {
    const form = ev.target.closest("form[data-action=resume]");
    if (form === null) { return; }
    ev.preventDefault();
    const payload = {};
    if (form.elements.value !== undefined) {
      const text = form.elements.value.value;
      try { payload.value = JSON.parse(text); } catch (e) { payload.value = text; }
    }
    const budget = form.elements.budget.value;
    if (budget !== "") { payload.budget = Number(budget); }
    act("/resume", payload, function (a) { return "Resumed: " + a.status + "."; });
  });

  window.addEventListener("pagehide", function () {
    stop();
    if (timer !== null) { clearTimeout(timer); timer = null; }
  });
  if (following()) { follow(); }
  watchWaiting();
})();
