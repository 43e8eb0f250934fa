// The Archtree dashboard: jobs, one job (tree, candidates, events, results) and devices, on
// hash routes. Kept live by the job's event stream and by polling at most every 2 s; no build
// step. ECharts (vendor/echarts.min.js) is loaded as a classic script and read from `window`.

const POLL_MS = 2000;
// An ended job's page only looks for the job's deletion elsewhere (another tab, the API).
const ENDED_POLL_MS = 10000;
// Event bursts (a replayed stream, several children finishing) trigger one refresh, not many.
const MIN_REFRESH_GAP_MS = 500;
const PAGE_SIZE = 20;
const MAX_EVENT_LINES = 400;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const ARTIFACTS = ["report.json", "arch.json", "model.safetensors"];
// The kinds the engine, the workers and the job store emit (EventSource needs them by name).
const EVENT_KINDS = [
  "queued", "status", "baseline", "feasibility", "depth_started", "child_started", "node",
  "child_skipped", "child_merged", "depth_done", "retuned", "reranked", "confirm_failed",
  "trim_compared", "filled", "note", "preparing",
  "confirmed", "final_finetune", "done", "cancel_requested", "task_lost", "resumed",
];
// Events after which the job's progress and tree have changed.
const REFRESH_ON = new Set(["status", "baseline", "depth_done", "reranked", "confirmed", "done"]);
const COLORS = { within: "#2e8b57", over: "#d9534f", pending: "#9aa5b1", chosen: "#f0ad00",
  front: "#3566c8", budget: "#555", retuned: "#7b4fb3" };
// The scatter series of the answer at the latency it was confirmed at, after the search.
const CONFIRMED_SERIES = "chosen, confirmed";
// The scatter series of the best few at their score after fine-tuning longer, after the search.
const RETUNED_SERIES = "tuned longer";

const echarts = window.echarts;

// What the page shows right now, for tests and curious operators (window.archtree).
const live = {
  view: null, status: null, treeNodes: 0, pendingNodes: 0, unclosedNodes: 0, candidates: 0,
  paretoPoints: 0, retunedPoints: 0, treeNote: null, scatterNote: null,
};
window.archtree = live;

// ---------------------------------------------------------------- helpers

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name.startsWith("data-") || name.startsWith("aria-") || name === "role") {
      element.setAttribute(name, value);
    } else element[name] = value;
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

const escapeHtml = (text) => echarts.format.encodeHTML(String(text ?? ""));
const ms = (value) =>
  value == null ? "—" : `${value.toFixed(value < 10 ? 3 : 1)} ms`;
const percent = (value) => (value == null ? "—" : `${(100 * value).toFixed(1)} %`);
// Negative with a minus sign (−0.012), as the changes are.
const decimal = (value, digits = 3) =>
  (value == null ? "—" : value.toFixed(digits).replace(/^-/, "−"));
const count = (value) => (value == null ? "—" : value.toLocaleString("en-US"));
// A widened answer's score gap to the answer with two standard errors: in points of accuracy,
// or as a difference of fidelities (not a share: no points).
function scoreGap(event, scoreName) {
  if (event.score_gap == null || event.score_gap_se == null) return "";
  const sign = event.score_gap >= 0 ? "+" : "−";
  if (scoreName === "fidelity") {
    return `; ${sign}${Math.abs(event.score_gap).toFixed(4)} ± ` +
      `${(2 * event.score_gap_se).toFixed(4)}`;
  }
  return `; ${sign}${Math.abs(100 * event.score_gap).toFixed(1)} ± ` +
    `${(200 * event.score_gap_se).toFixed(1)} points`;
}

function compact(value) {
  if (value == null) return "—";
  for (const [size, unit] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (Math.abs(value) >= size) return `${(value / size).toFixed(2)} ${unit}`;
  }
  return String(Math.round(value));
}

const signed = (value, text) => `${value > 0 ? "+" : value < 0 ? "−" : "±"}${text}`;

function relativeChange(before, after) {
  if (before == null || after == null || before === 0) return "—";
  const relative = (after - before) / before;
  return signed(relative, `${Math.abs(100 * relative).toFixed(1)} %`);
}

// Accuracy and score change by points, not relative to themselves.
function pointChange(before, after, scale = 1, unit = "") {
  if (before == null || after == null) return "—";
  const difference = (after - before) * scale;
  return signed(difference, `${Math.abs(difference).toFixed(scale === 1 ? 3 : 1)}${unit}`);
}

// What a job's candidates are scored by (`scored_by`: "accuracy" on the calibration split, or
// "fidelity" to the unpruned model's outputs when the data have no labels), in the page's
// words: fidelity, else score.
const scoreWord = (scoredBy) => (scoredBy === "fidelity" ? "fidelity" : "score");

// Times on the 24-hour clock everywhere (the event log, the badge, the summary, the tables).
const when = (unixSeconds) =>
  new Date(unixSeconds * 1000).toLocaleString([], { hourCycle: "h23" });
// To the minute, for a table's column (the whole time on hover).
// The month by name, so that no day reads as a month (7/12 or 12/7), and short.
const whenShort = (unixSeconds) => new Date(unixSeconds * 1000).toLocaleString([],
  { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
const clock = (unixSeconds) =>
  new Date(unixSeconds * 1000).toLocaleTimeString([], { hourCycle: "h23" });
const clockNow = () => clock(Date.now() / 1000);

// A text of the API's (or the page's) with Markdown `code` spans, as text and <code> nodes.
function withCode(text) {
  return String(text).split(/`([^`]+)`/).map((part, index) =>
    (index % 2 ? el("code", { text: part }) : part));
}

// A status in words, as the list's filter says it (waiting_for_device: waiting for a device).
const STATUS_WORDS = { waiting_for_device: "waiting for a device" };

function ago(unixSeconds) {
  const seconds = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return when(unixSeconds);
}

function statusBadge(status) {
  return el("span", {
    class: `status status-${status}`, text: STATUS_WORDS[status] ?? status, "data-status": status,
  });
}

// Uploaded inputs are stored as `artifact:jobs/<id>/inputs/<file>`: show the name the file
// was sent with (`sentName`, from the spec's upload_names), else the stored file's.
const source = (value, sentName) =>
  value?.startsWith("artifact:") ? `uploaded ${sentName || value.split("/").pop()}` : value ?? "—";

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// While the API is unreachable every page says so above what it shows, which is then only
// what the API last said; a ping every few seconds keeps this true on pages that stopped
// polling (a finished job). The badge says "live" only while the API answers without a server
// error: one that answers 5xx (its Redis gone) is "failing", and each page shows its message
// where it shows what failed to load.
// `onBack`: what a page does when the API answers again after none (a form's error cleared).
const connection = { lastContact: 0, downSince: null, onBack: null };
const PING_MS = 5000;
// How long a read waits for the API's answer before the page says that the API is not
// answering (a process stalled, a network that drops packets): without it the page kept
// saying "live" over what it last showed. A submission, which uploads files, waits as long as
// it takes.
const ANSWER_WAIT_MS = 10000;

// `state`: "live", "failing" (the API answered with a server error) or "down" (no answer).
function setConnection(state, text) {
  const badge = $("#connection");
  badge.classList.toggle("down", state !== "live");
  badge.textContent = text;
  const answered = state !== "down";
  if (answered) connection.lastContact = Date.now();
  if (answered === (connection.downSince === null)) return;
  connection.downSince = answered ? null : new Date();
  if (answered) connection.onBack?.();
  const banner = $("#offline");
  banner.hidden = answered;
  banner.textContent = answered ? "" :
    `The API is unreachable since ${clock(connection.downSince / 1000)}: this page ` +
    "shows what it last said, and updates again once it answers (it retries every few seconds).";
  $("#view").classList.toggle("stale", !answered);
}

setInterval(() => {
  if (connection.downSince === null && Date.now() - connection.lastContact < PING_MS) return;
  fetch("healthz", { method: "HEAD", signal: AbortSignal.timeout(PING_MS) })
    .then((response) => (response.ok
      ? setConnection("live", `live · ${clockNow()}`)
      : setConnection("down", "API unreachable")))
    .catch(() => setConnection("down", "API unreachable"));
}, PING_MS);

// The API took longer than ANSWER_WAIT_MS to answer a read: said in the top bar and banner.
function notAnswering() {
  setConnection("down", "API not answering");
  return new ApiError(`the API at ${location.host} has not answered in ` +
    `${ANSWER_WAIT_MS / 1000} s; this page tries again`, 0);
}

// Fetch JSON from the API; a failure throws ApiError with the API's one-line `detail`.
async function api(path, options = {}) {
  let response;
  const reading = (options.method ?? "GET") === "GET";
  // Given up on when no answer has begun in ANSWER_WAIT_MS; a large one (a job's tree, its
  // report) may take longer to arrive once it has.
  const waiting = new AbortController();
  const giveUp = reading ? setTimeout(() => waiting.abort(), ANSWER_WAIT_MS) : null;
  try {
    response = await fetch(path, reading ? { ...options, signal: waiting.signal } : options);
  } catch (error) {
    if (error?.name === "AbortError" && waiting.signal.aborted) throw notAnswering();
    setConnection("down", "API unreachable");
    // Not the browser's words for it ("Failed to fetch"): they say no more.
    throw new ApiError(`cannot reach the API at ${location.host}: nothing was sent; try again ` +
      "once it answers", 0);
  }
  clearTimeout(giveUp);
  const time = clockNow();
  if (response.status >= 500) setConnection("failing", `API error ${response.status} · ${time}`);
  else setConnection("live", `live · ${time}`);
  const isJson = (response.headers.get("content-type") ?? "").includes("json");
  const body = isJson ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = isJson && typeof body.detail === "string" ? body.detail : null;
    throw new ApiError(detail ?? `${response.status} ${response.statusText}`, response.status);
  }
  return body;
}

// Runs `task` now and then every `intervalMs` after it finishes (or as many ms as it, or
// `onError` when it throws, returns), until it or `onError` returns false or the poller is
// stopped; `now()` asks for an early run (never closer than MIN_REFRESH_GAP_MS).
class Poller {
  constructor(intervalMs, task, onError) {
    Object.assign(this, { intervalMs, task, onError, timer: null, running: false });
    Object.assign(this, { again: false, stopped: false, lastRun: 0 });
  }

  now() {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    clearTimeout(this.timer);
    const wait = this.lastRun + MIN_REFRESH_GAP_MS - Date.now();
    if (wait > 0) {
      this.timer = setTimeout(() => this.now(), wait);
      return;
    }
    this.run();
  }

  async run() {
    this.running = true;
    this.lastRun = Date.now();
    let answer;
    try {
      answer = await this.task();
    } catch (error) {
      answer = this.onError ? this.onError(error) : true;
    }
    this.running = false;
    if (this.stopped || answer === false) return;
    const nextMs = typeof answer === "number" ? answer : this.intervalMs;
    if (this.again) {
      this.again = false;
      this.now();
    } else {
      this.timer = setTimeout(() => this.now(), nextMs);
    }
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }
}

// A polled page's tables while the API answers its requests with an error (its Redis gone):
// the API's message in the page's `.load-error` box, and the rows it last gave dimmed and said
// to be out of date, or, before any answer, a line that says they could not be loaded. Its
// next answer clears all of it. An unreachable API is said once for the whole page instead
// (setConnection).
function loadState(root) {
  const box = $(".load-error", root);
  let loadedAt = null;
  const dimmed = () => root.querySelectorAll(".table-wrap, .waiting");
  return {
    answered() {
      loadedAt = new Date();
      box.hidden = true;
      box.replaceChildren();
      for (const element of dimmed()) element.classList.remove("out-of-date");
    },
    failed(error) {
      if (error.status === 0) return;
      const note = loadedAt
        ? `Out of date: what is shown is what the API gave at ${clock(loadedAt / 1000)}; ` +
          "it updates once the API answers again."
        : "Nothing could be loaded yet; the page asks again every few seconds.";
      box.replaceChildren(
        el("span", { class: "message", text: error.message }),
        el("span", { class: "note", text: note }));
      box.hidden = false;
      if (loadedAt) {
        for (const element of dimmed()) element.classList.add("out-of-date");
        return;
      }
      for (const table of root.querySelectorAll(".table-wrap table")) {
        const columns = table.querySelectorAll("thead th").length;
        replaceRows($("tbody", table), [el("tr", {}, el("td", {
          colSpan: columns, class: "muted", text: "Not loaded: the API answered with an error.",
        }))]);
      }
    },
  };
}

// Keyboard focus on `target` when it was on nothing (the body: the focused element was removed,
// hidden or disabled) or on one of `from`, so that the keyboard goes on from where it was.
function refocus(target, ...from) {
  const active = document.activeElement;
  if (!target || (active && active !== document.body && !from.includes(active))) return;
  target.focus();
}

// A table wider than its box scrolls sideways inside it (a phone): the box is then marked
// (a shadow at its edge) and a line above it says so. Watched as the window and the rows change.
function watchWideTables(root) {
  const watcher = new ResizeObserver(() => {
    for (const wrap of root.querySelectorAll(".table-wrap")) {
      const wide = wrap.scrollWidth > wrap.clientWidth + 1;
      wrap.classList.toggle("scrolls", wide);
      const hint = wrap.previousElementSibling;
      if (hint?.classList.contains("scroll-hint")) hint.hidden = !wide;
    }
  });
  for (const wrap of root.querySelectorAll(".table-wrap")) {
    wrap.before(el("p", {
      class: "scroll-hint muted", hidden: true, text: "Scroll the table sideways for more columns →",
    }));
    watcher.observe(wrap);
    for (const table of wrap.querySelectorAll("table")) watcher.observe(table);
  }
  return () => watcher.disconnect();
}

function template(id) {
  return document.getElementById(id).content.cloneNode(true);
}

// ---------------------------------------------------------------- jobs

function jobsView(root) {
  root.append(template("jobs-view"));
  // The page of the list and its status filter are kept in this history entry, for Back from a
  // job, and for the tab's session, for the top bar's Jobs link.
  const kept = history.state?.jobsOffset != null ? history.state : keptList();
  let offset = kept.jobsOffset ?? 0;
  const filter = $("#status-filter", root);
  filter.value = kept.jobsStatus ?? "";
  if (filter.selectedIndex < 0) filter.value = "";
  const turnTo = (next) => {
    offset = next;
    const list = { jobsOffset: offset, jobsStatus: filter.value };
    history.replaceState({ ...history.state, ...list }, "");
    try {
      sessionStorage.setItem(LIST_KEY, JSON.stringify(list));
    } catch {
      // Storage refused (private mode, quota): Back still keeps them.
    }
    poller.now();
  };
  const load = loadState(root);
  const focusAfter = { row: null };
  const poller = new Poller(POLL_MS, async () => {
    const asked = { offset, status: filter.value };
    const only = asked.status ? `&status=${asked.status.split(",").join("&status=")}` : "";
    const page = await api(`v1/jobs?offset=${asked.offset}&limit=${PAGE_SIZE}${only}`);
    // Turned to another page or filter meanwhile: that one is asked for next.
    if (offset !== asked.offset || filter.value !== asked.status) return;
    // Jobs deleted elsewhere can leave this page past the list's end: back to its last page.
    const lastPage = Math.max(0, Math.ceil(page.total / PAGE_SIZE) - 1) * PAGE_SIZE;
    if (!page.jobs.length && offset > lastPage) {
      turnTo(lastPage);
      return;
    }
    load.answered();
    renderJobs(root, page, filter.value, focusAfter);
  }, (error) => load.failed(error));
  $("#newer", root).addEventListener("click", () => turnTo(Math.max(0, offset - PAGE_SIZE)));
  $("#older", root).addEventListener("click", () => turnTo(offset + PAGE_SIZE));
  filter.addEventListener("change", () => turnTo(0));
  // An ended job's Delete button, asked first as on the job's own page. One listener for the
  // table: its rows are replaced on every poll that changes them.
  $("#jobs-table tbody", root).addEventListener("click", async (click) => {
    const button = click.target.closest("button[data-delete]");
    if (!button) return;
    const jobId = button.dataset.delete;
    if (!window.confirm(deleteQuestion(jobId))) return;
    // Once the row is gone, the keyboard goes on from the row that takes its place.
    Object.assign(focusAfter, {
      jobId, row: [...button.closest("tbody").rows].indexOf(button.closest("tr")),
    });
    button.disabled = true;
    $("#jobs-error", root).hidden = true;
    try {
      await api(`v1/jobs/${jobId}`, { method: "DELETE" });
    } catch (error) {
      // Deleted meanwhile elsewhere: what was asked is done, and its row goes with the poll.
      if (error.status !== 404) {
        showError($("#jobs-error", root), error.message);
        button.disabled = false;
        focusAfter.row = null;
        button.focus();
      }
    }
    poller.now();
  });
  setUpSubmitForm(root);
  poller.now();
  return () => poller.stop();
}

// The jobs list's page and filter as this tab last showed them ({} when none).
const LIST_KEY = "archtree.jobsList";
function keptList() {
  try {
    const kept = JSON.parse(sessionStorage.getItem(LIST_KEY) ?? "{}");
    return kept && typeof kept === "object" ? kept : {};
  } catch {
    return {};
  }
}

// A polled table's rows, replaced only when they changed, and not while the user selects text
// in them (a job id to copy): the next poll brings them up to date.
function replaceRows(tbody, rows) {
  if (rows.map((row) => row.outerHTML).join("") === tbody.innerHTML) return;
  const selection = window.getSelection();
  if (selection && !selection.isCollapsed && tbody.contains(selection.anchorNode)) return;
  tbody.replaceChildren(...rows);
}

// A cell of text the user chose (a model, an upload's file name, a device class), cut with an
// ellipsis where long so that the row's other columns stay in view; the whole text on hover.
const clipped = (value) => el("td", { class: "clip", title: value }, el("span", { text: value }));

function renderJobs(root, page, filtered, focusAfter) {
  const rows = page.jobs.map((job) => {
    const { progress, spec } = job;
    const { final } = progress;
    const best = final ?? progress.best;
    // The answer's validation accuracy, or fidelity without labels; else the best's score.
    let quality = "—";
    if (final?.accuracy != null) quality = `${percent(final.accuracy)} acc.`;
    else if (final?.fidelity != null) quality = `${decimal(final.fidelity)} fidelity`;
    else if (best?.score != null) quality = `${decimal(best.score)} ${scoreWord(progress.scored_by)}`;
    // A share of the unpruned latency, with what it came to; milliseconds as given.
    const budget = progress.budget_ms != null && spec.budget.endsWith("%")
      ? `${spec.budget} = ${ms(progress.budget_ms)}` : spec.budget;
    const model = spec.weights ? `${spec.model} + ${source(spec.weights, spec.upload_names?.weights)}` : spec.model;
    return el(
      "tr",
      { "data-job-id": job.id },
      el("td", {}, el("a", { href: `#/jobs/${job.id}`, text: job.id })),
      el("td", { text: whenShort(job.created_at), title: when(job.created_at) }),
      el("td", {}, statusBadge(job.status)),
      clipped(model),
      clipped(source(spec.data, spec.upload_names?.data)),
      clipped(spec.device_class),
      el("td", { text: budget }),
      el("td", { class: "num", text: count(progress.depth) }),
      el("td", { class: "num", text: count(progress.candidates_evaluated) }),
      el("td", { class: "num", text: count(progress.measurements) }),
      el("td", { class: "num", text: ms(best?.latency_ms) }),
      el("td", { class: "num", text: quality }),
      el(
        "td",
        {},
        FINAL.has(job.status)
          ? el("button", {
            type: "button", class: "danger small", "data-delete": job.id, text: "Delete",
            title: "Delete this job, its uploads, result files and events",
            "aria-label": `Delete job ${job.id}`,
          })
          : null,
      ),
    );
  });
  if (!rows.length) {
    const none = filtered ? "No jobs in this status." : "No jobs yet.";
    rows.push(el("tr", {}, el("td", { colSpan: 13, class: "muted", text: none })));
  }
  const tbody = $("#jobs-table tbody", root);
  replaceRows(tbody, rows);
  if (focusAfter.row != null && !page.jobs.some((job) => job.id === focusAfter.jobId)) {
    const next = tbody.rows[Math.min(focusAfter.row, tbody.rows.length - 1)];
    refocus(next?.querySelector("a") ?? $("#status-filter", root));
    focusAfter.row = null;
  }
  const last = Math.min(page.offset + page.jobs.length, page.total);
  $("#page-info", root).textContent = page.total
    ? `${page.offset + 1}–${last} of ${page.total}`
    : "";
  const newer = $("#newer", root);
  const older = $("#older", root);
  const focused = document.activeElement;
  newer.disabled = page.offset === 0;
  older.disabled = last >= page.total;
  // A pager button disabled under the keyboard (the last or first page reached): the other one.
  // Only then: a page that loads with nothing focused keeps its place (and its scroll).
  if (focused === older && older.disabled && !newer.disabled) newer.focus();
  if (focused === newer && newer.disabled && !older.disabled) older.focus();
}

const SEARCH_FIELDS = [
  "width", "branching", "planned_steps", "max_depth", "ft_steps", "max_probes",
  "select_top", "select_steps", "fill_probes", "final_epochs", "min_width_fraction", "margin",
  "seed",
];

// What was typed in the form, kept while the dashboard is open (files cannot be kept).
const formDraft = new Map();

function setUpSubmitForm(root) {
  const form = $("#submit-form", root);
  const error = $("#submit-error", root);
  for (const [name, value] of formDraft) {
    if (form.elements[name]) form.elements[name].value = value;
  }
  // The search settings' heading says how many are set (empty ones take the engine's
  // default), and the section is open when a draft brings some back.
  const settings = $("#submit-form details", root);
  const countSet = () => {
    const set = SEARCH_FIELDS.filter((name) => form.elements[name]?.value !== "").length;
    $("summary", settings).textContent = set
      ? `Search settings (${set} set; empty ones take the engine's default)`
      : "Search settings (empty: the engine's default)";
    return set;
  };
  if (countSet()) settings.open = true;
  form.addEventListener("input", (event) => {
    if (event.target.name && event.target.type !== "file") {
      formDraft.set(event.target.name, event.target.value);
    }
    countSet();
  });
  const dataFile = $(".data-file", root);
  const showDataFile = () => {
    dataFile.hidden = form.elements.data.value !== "upload";
  };
  form.elements.data.addEventListener("change", showDataFile);
  showDataFile();  // as the draft left it
  api("v1/devices")
    .then((list) => {
      const classes = new Set([...list.devices.map((d) => d.device_class), ...Object.keys(list.queue_depth)]);
      $("#device-classes", root).replaceChildren(...[...classes].sort().map((name) => el("option", { value: name })));
    })
    .catch(() => {});

  describeFields(form);
  // A field's error, beside it and in the box by the button.
  const refuse = (message, name) => {
    showError(error, message);
    markField(form, name ?? fieldNamed(message), message);
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    const fields = form.elements;
    const search = { strategy: fields.strategy.value };
    for (const name of SEARCH_FIELDS) {
      const input = fields[name];
      // The browser empties a number it cannot read (1e400, "1e"): say so, not the default.
      if (input.validity.badInput) {
        return refuse(`${labelOf(input)}: not a number; give one, or leave it empty for the default`, name);
      }
      if (input.value !== "") search[name] = Number(input.value);
    }
    if (!fields.model.value.trim()) {
      return refuse(`${labelOf(fields.model)}: give the model to prune, such as builtin:vgg, ` +
        "torchvision:resnet18 or timm:NAME", "model");
    }
    const spec = {
      model: fields.model.value.trim(),
      budget: fields.budget.value.trim(),
      device_class: fields.device_class.value.trim(),
      search,
    };
    const body = new FormData();
    if (fields.data.value === "upload") {
      const file = fields.data_file.files[0];
      if (!file) return refuse("choose a data file (.npz or .pt), or a builtin data set", "data_file");
      body.append("data", file, file.name);
    } else {
      spec.data = fields.data.value;
    }
    body.set("spec", JSON.stringify(spec));
    const weights = fields.weights.files[0];
    if (weights) body.append("weights", weights, weights.name);
    error.hidden = true;
    const button = fields["submit-button"];
    const label = button.textContent;
    button.disabled = true;
    button.textContent = "Submitting…";  // an upload, or an API slow to answer, takes a while
    try {
      const created = await api("v1/jobs", { method: "POST", body });
      location.hash = `#/jobs/${created.id}`;
    } catch (failure) {
      showError(error, inFormTerms(failure.message, form));
      // Said while the API is unreachable only: it goes once the API answers again.
      if (failure.status === 0) {
        connection.onBack = () => {
          if (error.isConnected) error.hidden = true;
          connection.onBack = null;
        };
        return;
      }
      // About the data sent as a file: beside the file input where it was chosen.
      let field = fieldNamed(failure.message);
      if (field === "data" && fields.data.value === "upload") field = "data_file";
      markField(form, field, inFormTerms(failure.message, form));
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  });
}

// The form field an API message is about: a spec field it names (search.width, budget: ...),
// else the first field it speaks of (the budget, the device class); null when none.
const SPOKEN_FIELDS = [
  ["budget", /\bbudget\b/i], ["device_class", /\bdevice class\b/i],
  ["weights", /\bweights\b/i], ["data", /\bdata\b/i], ["model", /\bmodel\b/i],
];
function fieldNamed(message) {
  const named = message.match(/\bsearch\.([a-z_]+)/) ?? message.match(/^(model|budget|device_class|data|weights):/);
  if (named) return named[1];
  const spoken = SPOKEN_FIELDS
    .map(([name, pattern]) => [name, message.search(pattern)])
    .filter(([, at]) => at >= 0)
    .sort((a, b) => a[1] - b[1]);
  return spoken.length ? spoken[0][0] : null;
}

// The field marked invalid, with the message under it (the box by the button keeps it too).
function markField(form, name, message) {
  const input = name ? form.elements[name] : null;
  if (!input || !input.closest) return;
  input.setAttribute("aria-invalid", "true");
  const note = el("span", { class: "field-error" }, ...withCode(message));
  input.closest("label").append(note);
  if (input.closest("details")) input.closest("details").open = true;
  input.focus();
}

function clearFieldErrors(form) {
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  for (const note of form.querySelectorAll(".field-error")) note.remove();
}

// Each search field's help, as the API documents the setting (its OpenAPI schema), on hover.
let searchSchema = null;  // fetched once
async function describeFields(form) {
  let properties;
  try {
    searchSchema ??= api("openapi.json").then((schema) => schema.components.schemas.SearchSettingsIn);
    properties = (await searchSchema).properties;
  } catch {
    searchSchema = null;
    return;  // the fields still work; only their help is missing
  }
  for (const name of ["strategy", ...SEARCH_FIELDS]) {
    const input = form.elements[name];
    const help = properties[name]?.description;
    if (input && help && !input.title) input.title = help;
    // The API's upper bound, for the field's arrows and the browser's own hint (the form is
    // checked by the API, which says what is wrong: novalidate).
    const bounds = [properties[name], ...(properties[name]?.anyOf ?? [])];
    const maximum = bounds.find((bound) => bound?.maximum != null)?.maximum;
    if (input && maximum != null && !input.max) input.max = String(maximum);
  }
}

// The submission form, as the jobs page shows it (its labels name the fields).
function submitForm() {
  return document.getElementById("jobs-view").content.querySelector("#submit-form");
}

// The text of the label around a form field, without the field's own text.
function labelOf(input) {
  const label = input.closest("label");
  if (!label) return input.name;
  return [...label.childNodes]
    .filter((node) => node.nodeType === Node.TEXT_NODE)
    .map((node) => node.textContent.trim())
    .join(" ")
    .trim() || input.name;
}

// The API's message in the form's terms: its field labels, not spec fields (search.width), cut
// to a readable length (the API echoes what was sent).
const MAX_MESSAGE_CHARS = 600;
function inFormTerms(message, form = submitForm()) {
  const text = namedAsInForm(message, form);
  if (text.length <= MAX_MESSAGE_CHARS) return text;
  // Cut in its middle, where an echoed value is: the advice is at its end.
  const half = Math.floor((MAX_MESSAGE_CHARS - 1) / 2);
  return `${text.slice(0, half)}…${text.slice(text.length - half)}`;
}

// A job's error, notes and log lines with the form's labels for the spec fields they name
// (search.width 2 is not used: search.strategy greedy runs with 1 -> Width 2 is not used:
// Strategy greedy runs with 1), whole.
function namedAsInForm(message, form = submitForm()) {
  const labelled = (name) => (form.elements[name] ? labelOf(form.elements[name]) : null);
  return message
    .replace(/^the job spec is not valid: /, "")
    .replace(/\bsearch\.([a-z_]+)/g, (field, name) => labelled(name) ?? field)
    .replace(/^(budget|model|device_class):/, (field, name) => `${labelled(name) ?? name}:`);
}

function showError(element, message) {
  element.replaceChildren(...withCode(message));
  element.hidden = false;
}

function deleteQuestion(jobId) {
  return `Delete job ${jobId}, its uploads, result files and events from the service? ` +
    "This cannot be undone.";
}

// ---------------------------------------------------------------- one job

function jobView(root, jobId) {
  root.append(template("job-view"));
  $("#job-id", root).textContent = jobId;
  const view = {
    id: jobId, root, job: null, tree: null, report: null,
    // What candidates are scored by, once the baseline says: "accuracy", or "fidelity" (no labels).
    scoredBy: undefined,
    // Children evaluated at depths not closed yet come from `node` events before the tree has them.
    eventNodes: new Map(), merged: new Set(),
    // Candidates fine-tuned longer after the search to pick the answer: id -> scores and steps.
    retuned: new Map(),
    treeChart: echarts.init($("#tree-chart", root)),
    scatterChart: echarts.init($("#scatter-chart", root)),
    renderQueued: false,
    closed: false,
  };
  const resize = () => {
    view.treeChart.resize();
    view.scatterChart.resize();
  };
  window.addEventListener("resize", resize);

  // The job deleted elsewhere (another tab, the API) while this page showed it; or, when it
  // had not ended as last seen, maybe lost with the service's Redis, which the page cannot
  // tell apart from a deletion whose final status it missed.
  const deleted = () => {
    view.closed = true;
    poller.stop();
    stream.close();
    const status = view.job?.status;
    const seen = STATUS_WORDS[status] ?? status;
    root.replaceChildren(status && !FINAL.has(status)
      ? notFound(`Job ${jobId} is gone from the service, last seen ${seen}: ` +
        "it ended and was deleted elsewhere, or the service's Redis lost it (restarted " +
        "without persistence, or flushed). Submit it again to run it anew.", "Job gone")
      : notFound(`Job ${jobId} was deleted elsewhere (another page or the API): its results ` +
        "and events are gone.", "Job deleted"));
  };
  // Once the job has ended, nothing of it changes but its deletion elsewhere, looked for
  // every ENDED_POLL_MS.
  const poller = new Poller(POLL_MS, async () => {
    if (view.ended) {
      const job = await api(`v1/jobs/${jobId}`);
      if (view.errorShown) {  // the API answers again: the job's own error comes back
        Object.assign(view, { job, errorShown: false });
        scheduleRender(view);
      }
      return ENDED_POLL_MS;
    }
    view.ended = !(await refreshJob(view));
    return view.ended ? ENDED_POLL_MS : POLL_MS;
  }, (error) => {
    if (error.status === 404 && !view.job) {
      root.replaceChildren(notFound(`No job ${jobId} on this service.`));
      return false;
    }
    if (error.status === 404) {
      deleted();
      return false;
    }
    // An unreachable API is said once for the whole page, above it (setConnection); a page
    // that has shown nothing of the job yet says so too, where the job would be.
    if (error.status !== 0 || !view.job) {
      showError($("#job-error", root), error.status !== 0 ? error.message
        : `Job ${jobId} could not be loaded yet: the API does not answer. The page asks ` +
          "again every few seconds.");
      view.errorShown = true;
    }
    return view.ended ? ENDED_POLL_MS : true;
  });
  const stream = followEvents(view, poller);
  $("#cancel", root).addEventListener("click", async () => {
    // Asked first, as Delete is: a search cancelled cannot go on, and may have run for hours.
    if (!window.confirm(`Cancel job ${jobId}? Its search stops and cannot go on from there.`)) {
      return;
    }
    $("#cancel", root).disabled = true;
    // The button is disabled, then hidden: the keyboard goes on from the job's status.
    $("#job-status", root).focus();
    try {
      view.job = await api(`v1/jobs/${jobId}/cancel`, { method: "POST" });
      scheduleRender(view);
    } catch (error) {
      if (error.status === 404) return deleted();
      showError($("#job-error", root), error.message);
    }
    poller.now();
  });
  $("#delete", root).addEventListener("click", async () => {
    if (!window.confirm(deleteQuestion(jobId))) return;
    $("#delete", root).disabled = true;
    try {
      await api(`v1/jobs/${jobId}`, { method: "DELETE" });
      view.closed = true;
      location.hash = "#/";
    } catch (error) {
      if (error.status === 404) return deleted();
      showError($("#job-error", root), error.message);
      $("#delete", root).disabled = false;
    }
  });
  poller.now();
  return () => {
    view.closed = true;
    poller.stop();
    stream.close();
    window.removeEventListener("resize", resize);
    view.treeChart.dispose();
    view.scatterChart.dispose();
  };
}

// Fetch the job and its tree (and the report once it succeeded); false once nothing can change.
async function refreshJob(view) {
  const [job, tree] = await Promise.all([
    api(`v1/jobs/${view.id}`),
    api(`v1/jobs/${view.id}/tree`),
  ]);
  Object.assign(view, { job, tree });
  // Kept with the job from its baseline on, as the baseline event says it.
  if (job.progress.scored_by) view.scoredBy = job.progress.scored_by;
  if (job.status === "succeeded" && !view.report) {
    view.report = await api(`v1/jobs/${view.id}/artifacts/report.json`);
  }
  scheduleRender(view);
  return !FINAL.has(job.status);
}

function followEvents(view, poller) {
  const stream = new EventSource(`v1/jobs/${view.id}/events`);
  const list = $("#events", view.root);
  const onEvent = (message) => {
    const event = JSON.parse(message.data);
    // Without labels, candidates are scored by fidelity to the unpruned model's outputs.
    if (event.kind === "baseline" && event.scored_by) view.scoredBy = event.scored_by;
    const line = el("li", { "data-kind": event.kind },
      el("time", { text: event.time ? clock(event.time) : "" }),
      el("span", { class: "kind", text: event.kind }),
      el("span", {}, ...withCode(describe(event, scoreWord(view.scoredBy)))));
    list.prepend(line);
    while (list.childElementCount > MAX_EVENT_LINES) list.lastElementChild.remove();
    if (event.kind === "node") {
      view.eventNodes.set(event.id, event);
      scheduleRender(view);
    } else if (event.kind === "child_merged") {
      view.merged.add(event.id);
    } else if (event.kind === "retuned" || event.kind === "reranked") {
      for (const node of event.nodes ?? [event]) noteRetuned(view, node, event.steps);
      scheduleRender(view);
    }
    if (REFRESH_ON.has(event.kind)) poller.now();
    // The stream ends with the job: without this, EventSource would reconnect forever.
    if (event.kind === "status" && FINAL.has(event.status)) stream.close();
  };
  for (const kind of EVENT_KINDS) stream.addEventListener(kind, onEvent);
  stream.onmessage = onEvent;
  return stream;
}

// A candidate's score before its longer fine-tune is the one comparable with the others'.
function noteRetuned(view, node, steps) {
  const before = view.retuned.get(node.id)?.before ?? node.score_before;
  view.retuned.set(node.id, { before, after: node.score, steps });
}

// The score a candidate had after the search's short fine-tune, as every candidate has one.
function searchScore(view, node) {
  return view.retuned.get(node.id)?.before ?? node.score;
}

// "1 child", "2 children".
function counted(count, one, many) {
  return `${count} ${count === 1 ? one : many}`;
}

// One line of the event log; `scoreName`: what a score is (fidelity when data-free).
function describe(event, scoreName = "score") {
  const score = (value) => `${scoreName} ${decimal(value)}`;
  const cached = event.cached ? ", cached" : "";
  switch (event.kind) {
    case "queued": return "waiting for a worker";
    case "status": {
      const status = STATUS_WORDS[event.status] ?? event.status;  // as the badge says it
      return event.error ? `${status}: ${namedAsInForm(event.error)}` : status;
    }
    case "baseline":
      return `unpruned ${ms(event.latency_ms)}${cached}, budget ${ms(event.budget_ms)}, ` +
        score(event.score);
    case "feasibility":
      return `smallest reachable model ${ms(event.smallest_ms)} (budget ${ms(event.budget_ms)})` +
        (event.widen_to > 1 ? `; widening to multiples of ${event.widen_to}` : "");
    case "depth_started":
      return `depth ${event.depth}: ${counted(event.children, "child", "children")} to evaluate`;
    case "child_started":
      return `${event.id} (depth ${event.depth}) evaluating` +
        (event.run > 1 ? ` again (run ${event.run}: an earlier run was cut short)` : "");
    case "task_lost": return lostTask(event);
    case "node":
      return `${event.id} from ${event.parent} by ${event.move}: ${ms(event.latency_ms)}, ` +
        `${score(event.score)}, ${event.within_budget ? "within" : "over"} budget`;
    case "child_skipped": return `${event.id} skipped: ${event.reason}`;
    case "child_merged":
      return event.into
        ? `${event.id} merged: same architecture as ${event.into}, which scored ` +
          (event.tie ? "as well" : "better")
        : `${event.id} merged: same architecture as a node already in the tree`;
    case "depth_done":
      return `depth ${event.depth} done: frontier ${(event.frontier ?? []).join(", ") || "empty"}` +
        (event.best ? `; best ${event.best.id} at ${ms(event.best.latency_ms)}` : "");
    case "retuned":
      return `${event.id} tuned ${event.steps} more steps: ${score(event.score)} ` +
        `(was ${decimal(event.score_before)})`;
    case "reranked":
      return `re-ranked after ${event.steps} more steps: ` +
        event.nodes.map((node) => `${node.id} ${decimal(node.score)}`).join(", ");
    case "confirm_failed":
      return `${event.id} measured ${ms(event.latency_ms)} on confirmation, over budget: next best`;
    case "trim_compared":
      return (event.trimmed
        ? `best trimmed to ${event.trimmed}: ${score(event.trimmed_score)} at ` +
          `${ms(event.trimmed_latency_ms)}`
        : "best cannot be trimmed further") +
        `; ${event.confirmed} ${score(event.confirmed_score)}: answer ${event.chosen}`;
    case "filled":
      if (event.id === null && event.unconfirmed_ms && event.unconfirmed_ms.length) {
        return `${event.answer} well under the aim; its widenings confirmed above the budget ` +
          `(${event.unconfirmed_ms.map(ms).join(", ")})`;
      }
      return event.id === null
        ? `${event.answer} well under the aim; no group could be widened within it`
        : `${event.answer} widened to ${event.id} (${event.groups.join(", ")}` +
          `${event.rebuilt_from ? `; rebuilt from ${event.rebuilt_from}` : ""}): ` +
          `${ms(event.latency_ms)}, ${score(event.score)} ` +
          `(was ${decimal(event.answer_score)}${scoreGap(event, scoreName)}): ` +
          `answer ${event.chosen}`;
    case "confirmed":
      return `${event.id} confirmed at ${ms(event.latency_ms)}${cached} ` +
        `(${counted(event.trims, "trim", "trims")})`;
    case "note": return namedAsInForm(event.message);
    case "preparing":
      return `unpruned model's outputs on ${event.samples.toLocaleString("en")} ${event.split} ` +
        `samples: ${percent(event.done / event.samples)}`;
    case "final_finetune":
      return `final fine-tuning, ${counted(event.epochs, "epoch", "epochs")}`;
    case "done": {
      // Validation accuracy, or without labels fidelity; neither in events of older versions.
      const quality = event.accuracy != null ? `accuracy ${percent(event.accuracy)}, `
        : event.fidelity != null ? `fidelity ${decimal(event.fidelity)}, ` : "";
      return `answer ${event.id}: ${ms(event.latency_ms)}, ${quality}${decimal(event.wall_s, 1)} s`;
    }
    case "cancel_requested": return "cancel requested";
    case "resumed":
      return `resumed ${decimal(event.elapsed_s, 0)} s into the search, ` +
        (event.done ? "its tree search finished" : `after depth ${event.depth}`);
    default:
      return JSON.stringify(Object.fromEntries(
        Object.entries(event).filter(([name]) => name !== "kind" && name !== "time")));
  }
}

function scheduleRender(view) {
  if (view.renderQueued) return;
  view.renderQueued = true;
  requestAnimationFrame(() => {
    view.renderQueued = false;
    if (view.job && !view.closed) renderJob(view);
  });
}

// The best candidate within budget among those shown, children of the depth in progress
// included: best score first; among equals, the one closest to the budget, as the engine ranks
// its answers (the tree's own best is chosen at the end of each depth).
function bestSoFar(nodes, rootId) {
  let best = null;
  for (const node of nodes.values()) {
    if (node.id === rootId || !node.within_budget || node.score == null) continue;
    if (!best || node.score > best.score ||
        (node.score === best.score && node.latency_ms > best.latency_ms)) best = node;
  }
  return best?.id;
}
live.bestSoFar = (nodes, rootId) => bestSoFar(new Map(nodes.map((n) => [n.id, n])), rootId);

// The tree's nodes plus evaluated children of a depth not closed: in progress (pending) while
// the job runs, left open (unclosed) once it ended without closing it (cancelled, failed).
function shownNodes(view) {
  const nodes = new Map((view.tree?.nodes ?? []).map((node) => [node.id, node]));
  const closedDepth = view.tree?.depth ?? 0;
  const open = [...view.eventNodes.values()]
    .filter((node) => !nodes.has(node.id) && !view.merged.has(node.id) && node.depth > closedDepth)
    .sort((a, b) => a.depth - b.depth);
  const state = FINAL.has(view.job?.status) ? { unclosed: true } : { pending: true };
  for (const node of open) {
    if (nodes.has(node.parent)) nodes.set(node.id, { ...node, ...state });
  }
  return nodes;
}

// What a node of a depth not closed is called, in the legend and its tooltip.
function openDepthLabel(status) {
  return FINAL.has(status) ? `depth left open (job ${status})` : "depth in progress";
}

// What a job waiting for its device class needs: an agent of that class, started so.
function waitingForDevice(deviceClass, until) {
  const command = `archtree agent --api ${location.origin} --device-class ${deviceClass}`;
  const by = until != null ? `, and fails if none is by ${clock(until)}` : "";
  return [
    `No agent of device class ${deviceClass} is online; the job goes on once one is${by}. ` +
      "Start one with ",
    el("code", { text: command }),
  ];
}

// A task whose worker stopped answering, and when another worker takes it.
function lostTask(task) {
  return `Worker ${task.worker} stopped answering in ${task.name.replace(/^archtree\./, "")} ` +
    `(silent ${Math.round(task.silent_s)} s); another worker takes the task by about ` +
    `${clock(task.back_by)}, if one is running.`;
}

function renderJob(view) {
  const { job, tree, root } = view;
  const { progress, spec } = job;
  live.status = job.status;
  $("#job-status", root).replaceChildren(statusBadge(job.status));
  $("#job-summary", root).textContent = [
    `model ${spec.model}${spec.weights ? ` + ${source(spec.weights, spec.upload_names?.weights)}` : ""}`,
    `data ${source(spec.data, spec.upload_names?.data)}`,
    `device class ${spec.device_class}`,
    `budget ${spec.budget}`,
    `strategy ${spec.search.strategy ?? "archtree"}`,
    `submitted ${when(job.created_at)}`,
  ].join(" · ");
  const cancel = $("#cancel", root);
  cancel.hidden = FINAL.has(job.status);
  cancel.disabled = job.cancel_requested;
  cancel.textContent = job.cancel_requested ? "Cancelling…" : "Cancel";
  $("#delete", root).hidden = !FINAL.has(job.status);
  const error = $("#job-error", root);
  error.hidden = !job.error;
  // In the terms of the form that submits jobs: its labels, not spec fields.
  error.replaceChildren(...(job.error ? withCode(inFormTerms(job.error)) : []));
  const waiting = $("#job-waiting", root);
  waiting.hidden = job.status !== "waiting_for_device";
  waiting.replaceChildren(...(waiting.hidden ? []
    : waitingForDevice(spec.device_class, progress.device_wait_until)));
  const lostTasks = job.lost_tasks ?? [];
  const lost = $("#job-lost", root);
  lost.hidden = lostTasks.length === 0;
  lost.textContent = lostTasks.map(lostTask).join(" ");
  const notes = progress.notes ?? [];
  const notesList = $("#job-notes", root);
  notesList.hidden = notes.length === 0;
  // In the form's terms too, as the error: settings by their labels (Width), not spec fields.
  notesList.replaceChildren(...notes.map((note) => el("li", {}, ...withCode(namedAsInForm(note)))));
  // Where the page names a data-free job's scores, its words for them (index.html's data-fidelity).
  if (view.scoredBy === "fidelity") {
    for (const words of root.querySelectorAll("[data-fidelity]")) {
      words.textContent = words.dataset.fidelity;
    }
  }

  const nodes = shownNodes(view);
  const rootNode = nodes.get(tree.root_id);
  const chosenId = progress.final?.id ?? bestSoFar(nodes, tree.root_id) ?? tree.best;
  const chosen = nodes.get(chosenId);
  const answerLabel = progress.final ? "Answer" : "Best so far";
  $("#job-stats", root).replaceChildren(
    // No depth before the root is measured (a job queued or waiting for its device).
    stat("Depth", count(progress.depth ?? (rootNode ? tree.depth : null))),
    stat("Candidates", count(progress.candidates_evaluated)),
    stat("Measurements", count(progress.measurements)),
    stat("Cache hits", count(progress.cache_hits)),
    stat("Unpruned", ms(progress.baseline_ms)),
    stat("Budget", ms(progress.budget_ms)),
    // The answer's latency as confirmed after the search, once it is; until then, as searched.
    stat(answerLabel, !chosen ? "—" : progress.final
      ? `${chosen.id} · ${ms(progress.final.latency_ms)} confirmed`
      : `${chosen.id} · ${ms(chosen.latency_ms)}`),
  );
  renderComparison(view, rootNode, chosen, answerLabel);
  renderArtifacts(view);
  renderTree(view, nodes, rootNode, chosenId);
  renderScatter(view, nodes, chosenId, progress.final);
}

function stat(name, value) {
  return el("div", {}, el("dt", { text: name }), el("dd", { text: value }));
}

function renderComparison(view, rootNode, chosen, answerLabel) {
  const { progress } = view.job;
  const baseline = view.report?.baseline ?? {
    latency_ms: progress.baseline_ms ?? rootNode?.latency_ms,
    params: rootNode?.params,
    macs: rootNode?.macs,
  };
  const final = view.report?.final ?? {
    latency_ms: progress.final?.latency_ms ?? chosen?.latency_ms,
    accuracy: progress.final?.accuracy,
    fidelity: progress.final?.fidelity,
    params: chosen?.params,
    macs: chosen?.macs,
  };
  // Without labels, fidelity to the unpruned model stands for accuracy (the unpruned model's own
  // is 0: the same outputs).
  const dataFree = view.scoredBy === "fidelity";
  const rows = [
    ["Latency", baseline.latency_ms, final.latency_ms, ms, relativeChange],
    dataFree
      ? ["Fidelity (validation)", 0, final.fidelity, (v) => decimal(v), pointChange]
      : ["Accuracy (validation)", baseline.accuracy, final.accuracy, percent,
        (before, after) => pointChange(before, after, 100, " pts")],
    [dataFree ? "Fidelity (calibration)" : "Score (calibration)", rootNode?.score, chosen?.score,
      (v) => decimal(v), pointChange],
    ["Parameters", baseline.params, final.params, compact, relativeChange],
    ["MACs", baseline.macs, final.macs, compact, relativeChange],
  ];
  $("#answer-head", view.root).textContent = answerLabel;
  $("#comparison tbody", view.root).replaceChildren(
    ...rows.map(([name, before, after, format, change]) =>
      el("tr", {},
        el("th", { text: name }),
        el("td", { class: "num", text: format(before) }),
        el("td", { class: "num", text: format(after) }),
        el("td", { class: "num", text: change(before, after) }))),
  );
}

function renderArtifacts(view) {
  const box = $("#artifacts", view.root);
  const ready = view.job.status === "succeeded";
  box.hidden = !ready;
  if (!ready || box.dataset.filled) return;
  box.dataset.filled = "yes";
  $(".downloads", box).replaceChildren(...ARTIFACTS.map((name) =>
    // Saved under the job's id (report-ID.json), so that two jobs' files keep apart.
    el("li", {}, el("a", {
      href: `v1/jobs/${view.id}/artifacts/${name}`,
      download: name.replace(/\.[^.]+$/, (suffix) => `-${view.id}${suffix}`),
      text: name,
    }))));
}

// Tooltip of a node: its move, latency, score (named `scoreName`) and the widths it changed from
// the unpruned model.
function nodeTooltip(node, rootNode, budgetMs, retuned, scoreName) {
  if (!node) return "";
  const open = node.pending || node.unclosed ? ` · ${openDepthLabel(live.status)}` : "";
  const lines = [`<b>${escapeHtml(node.id)}</b> · depth ${node.depth}${open}`];
  lines.push(node.move
    ? `move <b>${escapeHtml(node.move)}</b>${node.fraction != null ? ` (fraction ${decimal(node.fraction, 2)})` : ""} from ${escapeHtml(node.parent)}`
    : "the unpruned model");
  const fit = budgetMs == null ? "" : node.within_budget ? " · within budget" : ` · over budget by ${ms(node.latency_ms - budgetMs)}`;
  lines.push(`latency ${ms(node.latency_ms)} (${percent(node.ratio)} of unpruned)${fit}`);
  const score = retuned
    ? `${scoreName} ${decimal(retuned.before)} in the search, ${decimal(retuned.after)} after ` +
      `${retuned.steps} more fine-tuning steps`
    : `${scoreName} ${decimal(node.score)}`;
  lines.push(`${score} · params ${compact(node.params)} · MACs ${compact(node.macs)}`);
  if (!node.widths) {
    lines.push(node.unclosed ? "<i>its depth was never closed</i>" : "<i>widths once its depth is closed</i>");
  } else if (node !== rootNode && rootNode?.widths) {
    const changed = Object.entries(node.widths)
      .filter(([layer, width]) => rootNode.widths[layer] !== width)
      .map(([layer, width]) => `${escapeHtml(layer)} ${rootNode.widths[layer]}→${width}`);
    lines.push(changed.length ? `widths: ${changed.join(", ")}` : "widths unchanged");
  } else {
    lines.push(`widths: ${Object.entries(node.widths).map(([l, w]) => `${escapeHtml(l)} ${w}`).join(", ")}`);
  }
  return lines.join("<br>");
}

// What an empty chart says in its middle: why it has nothing to draw (yet), from the job's
// status; null once it has something.
function emptyChartNote(status, what) {
  const ended = { succeeded: "ended", failed: "failed", cancelled: "was cancelled" }[status];
  if (ended) return `No ${what}: the job ${ended} before its search drew any.`;
  return `No ${what} yet: the search draws them once it has measured and scored the unpruned model.`;
}

// The note drawn in the middle of an empty chart (an ECharts graphic), or none.
function chartNote(note) {
  return note == null ? [] : [{
    type: "text", left: "center", top: "middle", silent: true,
    style: {
      text: note, fill: "#52606d", font: "14px sans-serif", lineHeight: 20, width: 320,
      overflow: "break", align: "center",
    },
  }];
}

function renderTree(view, nodes, rootNode, chosenId) {
  const container = $("#tree-chart", view.root);
  container.dataset.nodes = String(nodes.size);
  live.treeNote = rootNode ? null : emptyChartNote(view.job.status, "nodes");
  container.setAttribute("aria-label", live.treeNote ? `Search tree: ${live.treeNote}`
    : `Search tree: ${counted(nodes.size, "node", "nodes")}` +
      (chosenId && nodes.has(chosenId) ? `, answer or best so far ${chosenId}` : ""));
  const shown = [...nodes.values()];
  Object.assign(live, {
    treeNodes: nodes.size,
    pendingNodes: shown.filter((node) => node.pending).length,
    unclosedNodes: shown.filter((node) => node.unclosed).length,
  });
  // An ended job's tree has no depth in progress: the swatch stays only for one left open.
  $("#open-depth-label", view.root).textContent = openDepthLabel(view.job.status);
  $("#open-depth-legend", view.root).hidden = FINAL.has(view.job.status) && !live.unclosedNodes;
  if (!rootNode) {
    view.treeChart.clear();
    view.treeChart.setOption({ graphic: chartNote(live.treeNote) });
    return;
  }
  const children = new Map();
  for (const node of nodes.values()) {
    if (node.parent == null || !nodes.has(node.parent)) continue;
    if (!children.has(node.parent)) children.set(node.parent, []);
    children.get(node.parent).push(node);
  }
  const order = (a, b) => Number(a.id.slice(1)) - Number(b.id.slice(1)) || a.id.localeCompare(b.id);
  const frontier = new Set(view.tree.frontier);
  const item = (node) => {
    const isChosen = node.id === chosenId;
    const color = node.pending || node.unclosed ? COLORS.pending : node.within_budget ? COLORS.within : COLORS.over;
    return {
      name: node.id,
      symbol: isChosen ? "diamond" : "circle",
      symbolSize: isChosen ? 24 : 13,
      itemStyle: {
        color,
        borderColor: isChosen ? COLORS.chosen : frontier.has(node.id) ? "#1f2933" : "#fff",
        borderWidth: isChosen ? 4 : frontier.has(node.id) ? 2 : 1,
      },
      label: { fontWeight: isChosen ? "bold" : "normal" },
      children: (children.get(node.id) ?? []).sort(order).map(item),
    };
  };
  const budgetMs = view.tree.budget_ms;
  const scoreName = scoreWord(view.scoredBy);
  view.treeChart.setOption({
    tooltip: {
      trigger: "item",
      confine: true,
      formatter: (params) => {
        const node = nodes.get(params.name);
        return nodeTooltip(node, rootNode, budgetMs, node && view.retuned.get(node.id), scoreName);
      },
    },
    series: [{
      type: "tree",
      data: [item(rootNode)],
      orient: "TB",
      layout: "orthogonal",
      top: 30, bottom: 40, left: 30, right: 30,
      initialTreeDepth: -1,
      expandAndCollapse: false,
      roam: true,
      animation: false,
      label: { position: "top", distance: 6, fontSize: 11, color: "#1f2933" },
      leaves: { label: { position: "bottom" } },
      lineStyle: { color: "#b8c2cc", width: 1.5, curveness: 0.3 },
    }],
    graphic: [],
  }, { replaceMerge: ["series", "graphic"] });
}

// Decimals that tell apart the latency axis's labels over a range of `span` ms (about five
// labels): none over tens of ms, more as the candidates' latencies draw closer.
const AXIS_LABELS = 5;
function latencyDecimals(span) {
  if (!(span > 0)) return 3;
  return Math.min(6, Math.max(0, Math.ceil(-Math.log10(span / AXIS_LABELS)) + 1));
}
live.latencyDecimals = latencyDecimals;
live.describe = describe;

// Points no other point beats on both latency (lower) and score (higher), by latency.
function paretoFront(points) {
  const sorted = [...points].sort((a, b) => a.latency_ms - b.latency_ms || b.score - a.score);
  const front = [];
  for (const point of sorted) {
    if (!front.length || point.score > front[front.length - 1].score) front.push(point);
  }
  return front;
}

// Candidates sit at the latency the search measured. The answer is re-measured once the search
// ends: that confirmed latency, which the stats give, is drawn apart and said so.
function renderScatter(view, nodes, chosenId, final) {
  // Every evaluated candidate: the tree's nodes and children merged away as duplicates.
  const all = new Map(nodes);
  for (const [id, node] of view.eventNodes) if (!all.has(id)) all.set(id, node);
  // Each at the score of the search's short fine-tune, which all candidates had; those tuned
  // longer after it (the answer among them) are drawn again at their longer score.
  const candidates = [...all.values()].map((node) => ({ ...node, score: searchScore(view, node) }));
  const retuned = [...all.values()].filter((node) => view.retuned.has(node.id));
  const front = paretoFront(candidates);
  const container = $("#scatter-chart", view.root);
  container.dataset.candidates = String(candidates.length);
  container.dataset.pareto = String(front.length);
  live.scatterNote = candidates.length ? null : emptyChartNote(view.job.status, "candidates");
  container.setAttribute("aria-label", `Candidates' latency against ${scoreWord(view.scoredBy)}: ` +
    (live.scatterNote ?? `${counted(candidates.length, "candidate", "candidates")}, ` +
      `${counted(front.length, "point", "points")} on the Pareto front`));
  Object.assign(live, {
    candidates: candidates.length, paretoPoints: front.length, retunedPoints: retuned.length,
  });
  const budgetMs = view.tree.budget_ms;
  const scoreName = scoreWord(view.scoredBy);
  const rootNode = nodes.get(view.tree.root_id);
  const point = (node) => [node.latency_ms, node.score, node.id];
  const unpruned = candidates.filter((n) => n.parent == null);
  const pruned = candidates.filter((n) => n.parent != null);
  const chosen = all.get(chosenId);
  const chosenScore = chosen ? view.retuned.get(chosen.id)?.after ?? chosen.score : null;
  const confirmed = chosen && final?.latency_ms != null ? [final.latency_ms, chosenScore, chosen.id] : null;
  const measured = candidates.map((n) => n.latency_ms).concat(confirmed ? [confirmed[0]] : []);
  // A budget far above every candidate (one the unpruned model meets many times over) would
  // squash them all against the axis: the range then leaves it out, and its line with it.
  const budgetShown = budgetMs != null && (!measured.length || budgetMs <= 2 * Math.max(...measured));
  const latencies = measured.concat(budgetShown ? [budgetMs] : []);
  const span = latencies.length ? Math.max(...latencies) - Math.min(...latencies) : 0;
  const pad = span * 0.08 || 0.01;
  const series = [
    { name: "within budget", type: "scatter", symbolSize: 10, itemStyle: { color: COLORS.within },
      data: pruned.filter((n) => n.within_budget).map(point) },
    { name: "over budget", type: "scatter", symbolSize: 10, itemStyle: { color: COLORS.over },
      data: pruned.filter((n) => !n.within_budget).map(point) },
    { name: "unpruned", type: "scatter", symbol: "rect", symbolSize: 12,
      itemStyle: { color: "#52606d" }, data: unpruned.map(point) },
    { name: "Pareto front", type: "line", step: "end", symbol: "emptyCircle", symbolSize: 16, z: 1,
      lineStyle: { color: COLORS.front, width: 2 }, itemStyle: { color: COLORS.front },
      data: front.map(point),
      markLine: !budgetShown ? undefined : {
        silent: true, symbol: "none",
        lineStyle: { type: "dashed", color: COLORS.budget },
        // Along the line, inside the plot: above it, the label met the y axis's name.
        label: { formatter: `budget ${ms(budgetMs)}`, position: "insideEndTop" },
        data: [{ xAxis: budgetMs }],
      } },
    { name: RETUNED_SERIES, type: "scatter", symbol: "emptyCircle", symbolSize: 11, z: 2,
      itemStyle: { color: COLORS.retuned, borderWidth: 2 },
      data: retuned.map((node) => [node.latency_ms, view.retuned.get(node.id).after, node.id]) },
    { name: "chosen", type: "scatter", symbol: "diamond", symbolSize: 20, z: 3,
      itemStyle: { color: COLORS.chosen, borderColor: "#1f2933" },
      data: chosen ? [[chosen.latency_ms, chosenScore, chosen.id]] : [] },
    { name: CONFIRMED_SERIES, type: "scatter", symbol: "emptyDiamond", symbolSize: 20, z: 4,
      itemStyle: { color: COLORS.chosen, borderWidth: 2 },
      data: confirmed ? [confirmed] : [] },
  ];
  view.scatterChart.setOption({
    animation: false,
    grid: { top: 70, left: 56, right: 24, bottom: 48 },
    // Two lines, never over the plot, naming only what is drawn: the candidates, then the
    // search's ending. Each scrolls when the chart is too narrow for it (a phone).
    legend: [series.slice(0, 4), series.slice(4)].map((row, index) => ({
      top: index * 22,
      type: "scroll",
      data: row.filter((one) => one.data.length).map((one) => one.name),
    })),
    tooltip: {
      trigger: "item",
      confine: true,
      formatter: (params) => {
        if (params.seriesName === "Pareto front") return `Pareto front: ${escapeHtml(params.value[2])}`;
        if (params.seriesName === CONFIRMED_SERIES) {
          return `<b>${escapeHtml(chosen.id)}</b>, the answer, re-measured after the search:<br>` +
            `${ms(confirmed[0])} confirmed (${ms(chosen.latency_ms)} during the search)`;
        }
        const node = all.get(params.value[2]);
        return nodeTooltip(node, rootNode, budgetMs, node && view.retuned.get(node.id), scoreName);
      },
    },
    xAxis: {
      type: "value", name: "latency (ms)", nameLocation: "middle", nameGap: 28,
      min: latencies.length ? Math.max(0, Math.min(...latencies) - pad) : null,
      max: latencies.length ? Math.max(...latencies) + pad : null,
      axisLabel: {
        formatter: (v) => v.toFixed(latencyDecimals(span + 2 * pad)),
        showMinLabel: false, showMaxLabel: false,
      },
    },
    yAxis: { type: "value", name: scoreName, scale: true },
    series,
    graphic: chartNote(live.scatterNote),
  }, { replaceMerge: ["series", "graphic"] });
}

// ---------------------------------------------------------------- devices

// Measurement totals per class over time, to count the last minute's; kept across views.
const measurementHistory = [];

function devicesView(root) {
  root.append(template("devices-view"));
  const load = loadState(root);
  const poller = new Poller(POLL_MS, async () => {
    const list = await api("v1/devices");
    load.answered();
    renderDevices(root, list, measurementHistory);
  }, (error) => load.failed(error));
  poller.now();
  return () => poller.stop();
}

function renderDevices(root, list, history) {
  const rows = list.devices.map((device) =>
    el("tr", { "data-device-id": device.id, "data-device-class": device.device_class },
      el("td", { text: device.host }),
      el("td", { class: "mono", text: device.id }),
      clipped(device.device_class),
      el("td", {}, el("span", {
        class: `status ${device.online ? "status-online" : "status-offline"}`,
        text: device.online ? "online" : "offline",
      })),
      el("td", { text: `${device.runtime} ${device.runtime_version}`.trim() }),
      clipped([device.cpu, device.gpu].filter(Boolean).join(" · ") || "—"),
      el("td", { class: "num", text: count(device.threads) }),
      el("td", { class: "num", text: count(device.measurements) }),
      el("td", { text: ago(device.last_seen) })));
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colSpan: 9, class: "muted" },
      ...withCode("No device registered: start one with `archtree agent`."))));
  }
  replaceRows($("#devices-table tbody", root), rows);

  const jobsWaiting = list.jobs_waiting ?? {};
  const classes = new Map();
  for (const name of [...Object.keys(list.queue_depth), ...Object.keys(jobsWaiting)]) {
    classes.set(name, { online: 0, measurements: 0 });
  }
  for (const device of list.devices) {
    const entry = classes.get(device.device_class) ?? { online: 0, measurements: 0 };
    entry.online += device.online ? 1 : 0;
    entry.measurements += device.measurements;
    classes.set(device.device_class, entry);
  }
  const now = Date.now();
  history.push({ at: now, totals: Object.fromEntries([...classes].map(([n, e]) => [n, e.measurements])) });
  while (history.length > 1 && history[1].at <= now - 60_000) history.shift();
  const since = history[0].totals;
  replaceRows($("#classes-table tbody", root), [...classes].sort().map(([name, entry]) =>
    el("tr", { "data-device-class": name },
      clipped(name),
      el("td", { class: "num", text: count(entry.online) }),
      el("td", { class: "num", text: count(list.queue_depth[name] ?? 0) }),
      el("td", { class: "num", text: count(jobsWaiting[name] ?? 0) }),
      el("td", { class: "num", text: count(entry.measurements) }),
      el("td", { class: "num", text: count(entry.measurements - (since[name] ?? 0)) }))));
  // A class that jobs wait for and no agent serves: the command that starts one.
  const unserved = [...classes].filter(([name, entry]) => jobsWaiting[name] && !entry.online);
  const hint = $("#classes-waiting", root);
  hint.hidden = unserved.length === 0;
  hint.replaceChildren(...unserved.flatMap(([name]) => [
    `${count(jobsWaiting[name])} ${jobsWaiting[name] === 1 ? "job waits" : "jobs wait"} for class ${name}: `,
    el("code", { text: `archtree agent --api ${location.origin} --device-class ${name}` }),
    el("br"),
  ]));
}

// ---------------------------------------------------------------- routing

let leaveView = () => {};

// A page for an address that names nothing here, with the way back.
function notFound(message, heading = "Not found") {
  return el("section", { class: "panel not-found" },
    el("h1", { text: heading }),
    el("p", { text: message }),
    el("p", {}, el("a", { href: "#/", text: "All jobs" })));
}

const JOBS_ROUTES = new Set(["", "#", "#/", "#/jobs", "#/jobs/"]);

function route() {
  leaveView();
  const root = $("#view");
  root.replaceChildren();
  const job = location.hash.match(/^#\/jobs\/([\w-]+)\/?$/);
  if (!job && !JOBS_ROUTES.has(location.hash) && location.hash !== "#/devices") {
    live.view = "not-found";
    document.title = "Not found · Archtree";
    root.append(notFound(`Nothing is at ${location.hash}: the dashboard has the jobs, one job ` +
      "(#/jobs/ID) and the devices."));
    leaveView = () => {};
    return;
  }
  live.view = job ? "job" : location.hash === "#/devices" ? "devices" : "jobs";
  Object.assign(live, { status: null, treeNodes: 0, candidates: 0, paretoPoints: 0 });
  for (const link of document.querySelectorAll("[data-nav]")) {
    const current = link.dataset.nav === (live.view === "job" ? "jobs" : live.view);
    link.toggleAttribute("aria-current", current);
  }
  document.title = job ? `Job ${job[1]} · Archtree` : live.view === "devices" ? "Devices · Archtree" : "Archtree";
  let leave;
  if (job) leave = jobView(root, job[1]);
  else if (live.view === "devices") leave = devicesView(root);
  else leave = jobsView(root);
  const unwatch = watchWideTables(root);
  leaveView = () => {
    unwatch();
    leave();
  };
  window.scrollTo(0, 0); // another page: from its top, not where the last one was scrolled to
}

// The skip link moves the keyboard to the page's heading without touching the address, whose
// hash is the page's route.
$("#skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  const target = $("#view h1") ?? $("#view");
  target.setAttribute("tabindex", "-1");
  target.focus();
});

window.addEventListener("hashchange", route);
route();
