// bnn-infosharing dashboard: plain JavaScript, no library.
// 1. Runs page: "Compare selected" is enabled once 2 or more runs are ticked.
// 2. Run page of an active run: polls its progress every few seconds, updates the status
//    and epoch count, and fetches the metric curves again when a new epoch arrives.
// 3. Runs page: each active run's row polls its progress the same way (status, epochs).
"use strict";

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

async function pollRow(row) {
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS + 2000 * Math.random()));
    const progress = await fetchProgress(row.dataset.progressUrl);
    if (!progress) continue;
    const done = row.querySelector('[data-field="epochs_done"]');
    const status = row.querySelector('[data-field="status"]');
    const bar = row.querySelector("progress");
    if (done) done.textContent = String(progress.epochs_done);
    if (bar) bar.value = progress.epochs_done;
    if (status) {
      status.textContent = progress.status;
      status.className = `status status-${progress.status}`;
    }
    if (!progress.active) {
      if (bar) bar.remove();
      return;
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setUpCompare();
  document.querySelectorAll("tr[data-progress-url]").forEach((row) => pollRow(row));
  const main = document.querySelector("main[data-progress-url]");
  if (main) poll(main);
});
