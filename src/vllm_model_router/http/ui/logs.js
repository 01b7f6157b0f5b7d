// A model's log on the dashboard: the Logs button of its row opens a dialog with the last lines its server
// printed (GET /admin/models/{name}/logs?lines=N, with the admin key as the other admin calls send it).
// Lines are shown as text, never as markup: a server prints whatever it likes.
"use strict";

const LOG_LINES = 200;

let logsModel = null;

async function loadLogs() {
  const model = logsModel;
  if (model === null) return;
  const pre = $("#logs-lines");
  const dialog = $("#logs");
  dialog.dataset.state = "loading";
  try {
    const resp = await fetch(`/admin/models/${encodeURIComponent(model)}/logs?lines=${LOG_LINES}`,
                             { headers: headers(), cache: "no-store" });
    if (model !== logsModel) return;  // another model's log was opened meanwhile
    if (!resp.ok) {
      pre.textContent = "";
      $("#logs-empty").textContent = `The log could not be read: ${await describeFailure(resp)}`;
      $("#logs-empty").hidden = false;
      dialog.dataset.state = "error";
      return;
    }
    const body = await resp.json();
    const lines = body.lines || [];
    pre.textContent = lines.join("\n");
    pre.dataset.lines = String(lines.length);
    $("#logs-empty").textContent = "No output yet.";
    $("#logs-empty").hidden = lines.length > 0;
    pre.scrollTop = pre.scrollHeight;  // the newest lines
    dialog.dataset.state = "loaded";
  } catch (e) {
    $("#logs-empty").textContent = `The log could not be read: the router did not answer (${e})`;
    $("#logs-empty").hidden = false;
    dialog.dataset.state = "error";
  }
}

function openLogs(model) {
  logsModel = model;
  const dialog = $("#logs");
  dialog.dataset.model = model;
  $("#logs-title").textContent = `${model}: the last ${LOG_LINES} lines of its output`;
  $("#logs-lines").textContent = "";
  $("#logs-empty").hidden = true;
  if (!dialog.open) dialog.showModal();
  loadLogs();
}

function initLogs() {
  $("#logs-refresh").addEventListener("click", loadLogs);
  $("#logs-close").addEventListener("click", () => $("#logs").close());
  $("#logs").addEventListener("close", () => { logsModel = null; });
}

document.addEventListener("DOMContentLoaded", initLogs);
