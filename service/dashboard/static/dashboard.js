// bnn-infosharing dashboard: plain JavaScript, no library.
// 1. Runs page: "Compare selected" is enabled once 2 or more runs are ticked.
// 2. Run page of an active run: polls its progress every few seconds, updates the status
//    and epoch count, and fetches the metric curves again when a new epoch arrives.
// 3. Runs page: the active runs' rows are polled together, one request for all of them
//    (GET /ui/progress?runs=a,b), and updated the same way (status, epochs).
// 4. Run page: the name/tags form and the cancel button call the JSON API (PATCH
//    /runs/{id}, POST /runs/{id}/cancel) with the X-BNN-CSRF header that writes authorised
//    by the login cookie need; errors show the API's message.
// 5. Run page: the plot explorer shows the options of the chosen plot kind only, and says
//    why a plot could not be drawn.
"use strict";

const CSRF = { "X-BNN-CSRF": "1" };

const POLL_MS = 3000;

function setUpCompare() {
  const form = document.getElementById("compare-form");
  if (!form) return;
  const button = document.getElementById("compare-button");
  const hint = document.getElementById("compare-hint");
  const min = Number(button.dataset.min || 2);
  const update = () => {
    const n = form.querySelectorAll('input[name="run"]:checked').length;
    button.disabled = n < min;
    hint.textContent = n < min ? `select ${min} or more runs (${n} selected)` : `${n} selected`;
  };
  form.addEventListener("change", update);
  update();
}

async function poll(main) {
  const done = document.getElementById("epochs-done");
  const status = document.getElementById("run-status");
  const bar = document.getElementById("epochs-progress");
  let seen = done ? Number(done.textContent) : 0;
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    const progress = await fetchProgress(main.dataset.progressUrl);
    if (!progress) continue;
    if (done) done.textContent = String(progress.epochs_done);
    if (bar) bar.value = progress.epochs_done;
    if (status) {
      status.textContent = progress.status;
      status.className = `status status-${progress.status}`;
    }
    if (progress.epochs_done !== seen && main.dataset.metricsUrl) {
      seen = progress.epochs_done;
      try {
        const response = await fetch(main.dataset.metricsUrl);
        if (response.ok) document.getElementById("metrics").innerHTML = await response.text();
      } catch (err) {
        // keep the curves shown; the next new epoch fetches them again
      }
    }
    if (!progress.active) return;
  }
}

async function fetchProgress(url) {
  try {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    return response.ok ? await response.json() : null;
  } catch (err) {
    return null; // the server may be restarting: try again at the next tick
  }
}

async function pollRows(table) {
  const rows = new Map();
  table.querySelectorAll("tr[data-progress-url][data-run-id]").forEach((row) => {
    rows.set(row.dataset.runId, row);
  });
  while (rows.size) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS + 1000 * Math.random()));
    const url = `${table.dataset.progressUrl}?runs=${[...rows.keys()].join(",")}`;
    const answer = await fetchProgress(url);
    if (!answer) continue;
    const seen = new Set();
    for (const progress of answer.runs) {
      const row = rows.get(progress.run_id);
      if (!row) continue;
      seen.add(progress.run_id);
      showProgress(row, progress);
      if (!progress.active) rows.delete(progress.run_id);
    }
    for (const id of [...rows.keys()]) if (!seen.has(id)) rows.delete(id); // deleted runs
  }
}

function showProgress(row, progress) {
  const done = row.querySelector('[data-field="epochs_done"]');
  const status = row.querySelector('[data-field="status"]');
  const bar = row.querySelector("progress");
  if (done) done.textContent = String(progress.epochs_done);
  if (bar) bar.value = progress.epochs_done;
  if (status) {
    status.textContent = progress.status;
    status.className = `status status-${progress.status}`;
  }
  if (!progress.active && bar) bar.remove();
}

async function callApi(url, method, body) {
  // -> [ok, message]: the API's error message, or a network failure in words
  try {
    const headers = { ...CSRF, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let payload = null;
    try {
      payload = await response.json();
    } catch (err) {
      payload = null;
    }
    if (response.ok) return [true, payload];
    const message = payload && payload.error ? payload.error.message : `HTTP ${response.status}`;
    return [false, response.status === 401 ? `${message} (log in first)` : message];
  } catch (err) {
    return [false, `the service did not answer (${err})`];
  }
}

function say(element, text, bad) {
  if (!element) return;
  element.textContent = text;
  element.className = bad ? "error" : "ok";
}

function showTags(tags) {
  const box = document.getElementById("run-tags");
  if (!box) return;
  const root = document.body.dataset.root || "";
  box.replaceChildren();
  for (const tag of tags) {
    const link = document.createElement("a");
    link.className = "tag";
    link.href = `${root}/?tag=${encodeURIComponent(tag)}`;
    link.textContent = tag;
    box.append(" ", link);
  }
}

function setUpEdit() {
  const form = document.getElementById("run-edit-form");
  if (!form) return;
  const message = document.getElementById("run-edit-message");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = document.getElementById("run-name-input").value.trim();
    const given = document.getElementById("run-tags-input").value.split(",");
    const tags = [...new Set(given.map((t) => t.trim()).filter((t) => t))];
    say(message, "saving…", false);
    const [ok, result] = await callApi(form.dataset.patchUrl, "PATCH", { name, tags });
    if (!ok) return say(message, result, true);
    document.getElementById("run-name").textContent = result.name;
    document.title = `${result.name} · bnn`;
    showTags(result.tags);
    say(message, "saved", false);
  });
}

function setUpCancel() {
  const box = document.getElementById("run-cancel-box");
  if (!box) return;
  const first = document.getElementById("run-cancel");
  const confirmBox = document.getElementById("run-cancel-confirm-box");
  const message = document.getElementById("run-cancel-message");
  first.addEventListener("click", () => {
    confirmBox.hidden = false;
    first.hidden = true;
  });
  document.getElementById("run-cancel-abort").addEventListener("click", () => {
    confirmBox.hidden = true;
    first.hidden = false;
  });
  document.getElementById("run-cancel-confirm").addEventListener("click", async () => {
    confirmBox.hidden = true;
    say(message, "cancelling…", false);
    const [ok, result] = await callApi(box.dataset.cancelUrl, "POST");
    if (!ok) {
      first.hidden = false;
      return say(message, result, true);
    }
    const status = document.getElementById("run-status");
    status.textContent = result.status;
    status.className = `status status-${result.status}`;
    say(message, "cancelled: it stops after the epoch in progress", false);
  });
}

function setUpPlots() {
  const kind = document.getElementById("plot-kind");
  const form = document.getElementById("plot-form");
  if (form) {
    // the same GET as without the script, less the options left at their default
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const params = new URLSearchParams();
      for (const [key, value] of new FormData(form)) {
        const field = form.elements.namedItem(key);
        const fallback = field && field.dataset ? field.dataset.default : undefined;
        if (value !== "" && value !== fallback) params.append(key, value);
      }
      const action = form.getAttribute("action").split("#")[0];
      window.location.assign(`${action}?${params}#plot-explorer`);
    });
  }
  if (kind) {
    const show = () => {
      document.querySelectorAll("fieldset.plot-options").forEach((set) => {
        const chosen = set.dataset.plotKind === kind.value;
        set.hidden = !chosen;
        set.disabled = !chosen;
      });
    };
    kind.addEventListener("change", show);
    show();
  }
  const image = document.getElementById("plot-image");
  if (image) {
    image.addEventListener("error", async () => {
      const shown = document.getElementById("plot-load-error");
      const [, message] = await callApi(image.src, "GET");
      if (shown) {
        shown.hidden = false;
        shown.textContent = `the plot could not be drawn: ${message}`;
      }
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpCompare();
  setUpEdit();
  setUpCancel();
  setUpPlots();
  const table = document.querySelector("table[data-progress-url]");
  if (table) pollRows(table);
  const main = document.querySelector("main[data-progress-url]");
  if (main) poll(main);
});
