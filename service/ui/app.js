// The raysft dashboard: jobs, a job's curves and data, and runs compared. Pages are routed by the
// URL's fragment (#/jobs, #/jobs/ID, #/compare/ID,ID), which holds ids and filters, never the key.

import { ApiError, api, apiKey, chatStream, optional } from "./api.js";
import { lineChart } from "./chart.js";
import { formatNumber, formatSeconds, formatTime, h } from "./dom.js";

const REFRESH_MS = 3000;
const PAGE_SIZE = 50;
const STATUSES = ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "LOST"];
const KINDS = ["dataset", "training", "pipeline", "evaluation"];
const ANSI_ESCAPES = /\x1b\[[0-9;]*[A-Za-z]/g;
const isActive = (job) => job.status === "QUEUED" || job.status === "RUNNING";
const trains = (job) => job.kind === "training" || job.kind === "pipeline";
const prepares = (job) => job.kind === "dataset" || job.kind === "pipeline";
const view = document.getElementById("view");
const problem = document.getElementById("problem");
const signOut = document.getElementById("sign-out");
const compared = new Set(); // trainings ticked in the list, kept across its pages and refreshes
let shown = null; // the page on screen; a refresh of any other stops

// ---------------------------------------------------------------- routing and refresh

function route() {
  shown = null;
  say("");
  if (!apiKey.get()) return signIn();
  signOut.hidden = false;
  const [path, query] = location.hash.slice(1).split("?");
  const [section, arg] = path.split("/").filter(Boolean);
  if (section === "jobs" && arg) return open(jobPage(arg));
  if (section === "compare") return open(comparePage((arg || "").split(",").filter(Boolean)));
  return open(jobsPage(new URLSearchParams(query)));
}

// Shows a page and refreshes it every REFRESH_MS for as long as its refresh says it is live.
function open(page) {
  shown = page;
  view.replaceChildren(page.node);
  const tick = async () => {
    if (shown !== page) return;
    let live = true;
    try {
      live = await page.refresh();
      say("");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return signIn("The API key was refused: enter it again.");
      say(error.message);
      live = !(error instanceof ApiError && error.status === 404);
    }
    if (live && shown === page) setTimeout(tick, REFRESH_MS);
  };
  tick();
}

function say(message) {
  problem.textContent = message;
  problem.hidden = !message;
}

function signIn(message = "") {
  shown = null;
  signOut.hidden = true;
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true,
    placeholder: "rsk_…" });
  const error = h("p", { class: "error", role: "alert" }, message);
  const submit = async (event) => {
    event.preventDefault();
    apiKey.set(input.value.trim());
    input.value = ""; // the key is kept only in session storage
    try {
      await api("jobs", { query: { limit: 1 } });
      route();
    } catch (e) {
      apiKey.clear();
      error.textContent = e.message;
    }
  };
  view.replaceChildren(h("form", { class: "sign-in", onsubmit: submit },
    h("h1", {}, "raysft"),
    h("label", { for: "api-key" }, "API key"), input,
    h("button", { type: "submit" }, "Sign in"),
    h("p", { class: "hint" }, "The key stays in this tab (session storage) and is sent only as a Bearer header."),
    error));
  input.focus();
}

async function cancel(job) {
  if (!window.confirm(`Cancel ${job.kind} ${job.id}? Ray stops its workers; checkpoints already written stay.`)) return;
  await api(`jobs/${job.id}/cancel`, { method: "POST" });
  route();
}

// ---------------------------------------------------------------- the job list

function jobsPage(params) {
  const filters = { status: params.get("status") || "", kind: params.get("kind") || "" };
  const page = Math.max(0, Number.parseInt(params.get("page") || "0", 10) || 0);
  const go = (change) => {
    const next = new URLSearchParams(Object.entries({ ...filters, page, ...change }).filter(([, v]) => v));
    location.hash = `#/jobs${next.size ? `?${next}` : ""}`;
  };
  const choice = (name, options, value) => h("label", {}, `${name} `,
    h("select", { id: `filter-${name}`, onchange: (e) => go({ [name]: e.target.value, page: 0 }) },
      ["", ...options].map((o) => h("option", { value: o, selected: o === value }, o || "any"))));
  const rows = h("tbody");
  const range = h("span", { id: "range" });
  const newer = h("button", { type: "button", onclick: () => go({ page: page - 1 }) }, "‹ Newer");
  const older = h("button", { type: "button", onclick: () => go({ page: page + 1 }) }, "Older ›");
  const compare = h("button", { id: "compare", type: "button",
    onclick: () => { location.hash = `#/compare/${[...compared].join(",")}`; } });
  const showCompared = () => {
    compare.textContent = `Compare ${compared.size} selected`;
    compare.disabled = compared.size < 2;
  };
  const row = (job) => {
    const tick = h("input", { type: "checkbox", "aria-label": `compare ${job.id}`, checked: compared.has(job.id),
      disabled: !trains(job),
      onchange: (e) => { e.target.checked ? compared.add(job.id) : compared.delete(job.id); showCompared(); } });
    return h("tr", { "data-job": job.id },
      h("td", {}, tick),
      h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
      h("td", {}, jobName(job)),
      h("td", {}, job.kind),
      h("td", {}, badge(job.status)),
      h("td", {}, progressBar(job.progress.percent)),
      h("td", {}, formatTime(job.created_at)),
      h("td", {}, formatTime(job.finished_at)),
      h("td", {}, isActive(job) ? h("button", { type: "button", class: "cancel", onclick: () => cancel(job) }, "Cancel") : ""));
  };
  const node = h("section", { class: "jobs" },
    h("div", { class: "toolbar" }, choice("status", STATUSES, filters.status), choice("kind", KINDS, filters.kind), compare),
    h("table", {}, h("thead", {}, h("tr", {}, ["", "id", "name", "kind", "status", "progress", "created", "finished", ""]
      .map((t) => h("th", {}, t)))), rows),
    h("div", { class: "pager" }, newer, range, older));

  async function refresh() {
    const result = await api("jobs", { query: { ...filters, limit: PAGE_SIZE, offset: page * PAGE_SIZE } });
    const last = result.offset + result.items.length;
    rows.replaceChildren(...(result.items.length ? result.items.map(row) : [h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No jobs."))]));
    range.textContent = result.total ? `${result.offset + 1}–${last} of ${result.total}` : "0 jobs";
    newer.disabled = page === 0;
    older.disabled = last >= result.total;
    showCompared();
    return true;
  }
  return { node, refresh };
}

// ---------------------------------------------------------------- one job

function jobPage(id) {
  const header = h("div", { class: "job-header" });
  const figures = h("div", { class: "stats" });
  const charts = h("div", { class: "charts" });
  const answers = h("section", { id: "answers" });
  const evaluations = h("section", { id: "evaluations" });
  const dataset = h("section", { id: "dataset" });
  const outputs = h("section", { id: "artifacts" });
  const tryIt = h("section", { id: "try-it" });
  const log = h("pre", { id: "log", class: "log" });
  let report = null; // a preparation's report does not change once written
  let sweep = null; // the runs of the sweep a training belongs to, fixed once created
  const node = h("article", { class: "job" }, header, tryIt, figures, charts, answers, evaluations, dataset, outputs,
    h("h2", {}, "Log (last 200 lines)"), log);

  async function refresh() {
    const job = await api(`jobs/${id}`);
    if (job.sweep_id && !sweep) sweep = (await api(`sweeps/${job.sweep_id}`)).jobs.map((j) => j.id);
    header.replaceChildren(...jobHeader(job, sweep));
    if (trains(job)) {
      const history = await optional(api(`jobs/${id}/metrics`), []);
      figures.replaceChildren(...trainingFigures(job, history));
      charts.replaceChildren(...trainingCharts(history));
      answers.replaceChildren(...generations(history));
      const scored = await optional(api("jobs", { query: { kind: "evaluation", evaluates: id } }), null);
      evaluations.replaceChildren(...evaluationsOf(scored ? scored.items : []));
    }
    if (job.kind === "evaluation") answers.replaceChildren(...evaluationReport(job));
    if (prepares(job) && !report) {
      report = await optional(api(`jobs/${id}/dataset`), null);
      dataset.replaceChildren(...(report ? datasetReport(report) : [h("h2", {}, "Dataset"),
        h("p", { class: "empty" }, "The preparation has not written its manifest yet.")]));
    }
    outputs.replaceChildren(...artifacts(job.artifacts));
    if (trains(job) && job.status === "SUCCEEDED" && !tryIt.hasChildNodes()) tryIt.replaceChildren(...chatPanel(id));
    const text = await optional(api(`jobs/${id}/logs`, { query: { tail: 200 } }), "(no log yet)");
    log.textContent = text.replace(ANSI_ESCAPES, ""); // Ray colours its prefixes for terminals
    return isActive(job) || (prepares(job) && !report);
  }
  return { node, refresh };
}

// "Try it": chat with the fine-tuned model and, beside it, the model it started from. Each side
// keeps its own conversation; answers stream in as the models on the cluster write them.
function chatPanel(id) {
  const sides = [{ name: "fine-tuned", query: {} }, { name: "base model", query: { base: true } }]
    .map((side) => ({ ...side, messages: [], log: h("div", { class: "chat-log", "data-side": side.name }) }));
  const prompt = h("textarea", { id: "chat-prompt", rows: 3, placeholder: "Ask both models something" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  async function ask(side, content) {
    side.messages.push({ role: "user", content });
    side.log.append(h("p", { class: "chat-user" }, content));
    const reply = h("p", { class: "chat-assistant" });
    side.log.append(reply);
    try {
      await chatStream(`jobs/${id}/chat`, { query: side.query, body: { messages: side.messages, max_tokens: 256 } },
        (text) => reply.append(text));
      side.messages.push({ role: "assistant", content: reply.textContent });
    } catch (error) {
      side.messages.pop();
      reply.classList.add("error");
      reply.textContent = error.message;
    }
  }
  const form = h("form", {
    class: "chat-form",
    onsubmit: async (event) => {
      event.preventDefault();
      const content = prompt.value.trim();
      if (!content) return;
      prompt.value = "";
      send.disabled = true;
      await Promise.all(sides.map((side) => ask(side, content)));
      send.disabled = false;
    },
  }, prompt, send);
  return [h("h2", {}, "Try it"),
    h("div", { class: "chat-sides" }, sides.map((side) => h("div", { class: "chat-side" }, h("h3", {}, side.name), side.log))),
    form];
}

function jobHeader(job, sweep) {
  return [
    h("h1", {}, `${job.kind} ${jobName(job)} `, badge(job.status)),
    h("p", { class: "meta" }, `${job.id} · created ${formatTime(job.created_at)} · started ${formatTime(job.started_at)}`
      + ` · finished ${formatTime(job.finished_at)}`),
    job.children.length ? h("p", { class: "meta" }, "jobs: ", job.children.map((c) => h("a", { href: `#/jobs/${c}` }, `${c} `))) : "",
    job.evaluates ? h("p", { class: "meta" }, "evaluates the training ",
      h("a", { id: "evaluated", href: `#/jobs/${job.evaluates}` }, job.evaluates)) : "",
    sweep ? h("p", { class: "meta" }, `one of the ${sweep.length} runs of sweep ${job.sweep_id.slice(0, 8)}: `,
      h("a", { id: "compare-sweep", href: `#/compare/${sweep.join(",")}` }, "compare them")) : "",
    job.error ? h("p", { class: "error" }, job.error) : "",
    h("div", { class: "progress-line" }, progressBar(job.progress.percent),
      isActive(job) ? h("button", { type: "button", class: "cancel", onclick: () => cancel(job) }, "Cancel") : ""),
  ];
}

function trainingFigures(job, history) {
  const last = history.at(-1) || {};
  const evals = history.filter((e) => e.eval_loss !== undefined);
  const p = job.progress;
  const figure = (label, value) => h("div", { class: "figure" }, h("span", { class: "label" }, label), h("span", { class: "value" }, value));
  return [
    figure("step", p.step !== null && p.step !== undefined ? `${p.step} / ${p.total_steps ?? "?"}` : "–"),
    figure("loss", formatNumber(last.loss)),
    figure("eval loss", formatNumber(evals.at(-1)?.eval_loss)),
    figure("perplexity", formatNumber(evals.at(-1)?.perplexity)),
    figure("sequence accuracy", formatNumber(evals.at(-1)?.sequence_accuracy)),
    figure("tokens/s", formatNumber(p.tokens_per_s, 5)),
    figure("tokens trained", p.tokens_seen === undefined || p.tokens_seen === null ? "–" : p.tokens_seen.toLocaleString()),
    figure("ETA", isActive(job) ? formatSeconds(p.eta_s) : "–"),
    // Reported by GPU workers only: on CPU there is no such figure, so none is shown.
    ...(last.gpu_peak_allocated_gib === undefined ? [] : [
      figure("GPU memory peak", `${formatNumber(last.gpu_peak_allocated_gib, 3)} GiB`),
      ...(last.gpu_workers || []).map((w, rank) => figure(`worker ${rank} GPU`,
        `${formatNumber(w.gpu_peak_reserved_gib, 3)} GiB reserved` +
        (w.gpu_utilization_pct === undefined ? "" : `, ${formatNumber(w.gpu_utilization_pct, 3)}% busy`))),
    ]),
  ];
}

const curve = (history, key) => history.filter((e) => typeof e[key] === "number").map((e) => [e.step, e[key]]);

function trainingCharts(history) {
  return [
    lineChart({ id: "chart-loss", title: "Training loss", series: [{ name: "loss", points: curve(history, "loss") }] }),
    lineChart({ id: "chart-lr", title: "Learning rate", series: [{ name: "lr", points: curve(history, "lr") }] }),
    lineChart({ id: "chart-eval", title: "Eval loss", series: [{ name: "eval loss", points: curve(history, "eval_loss") }] }),
    lineChart({ id: "chart-perplexity", title: "Perplexity", series: [{ name: "perplexity", points: curve(history, "perplexity") }] }),
    lineChart({ id: "chart-throughput", title: "Tokens/s", series: [{ name: "tokens/s", points: curve(history, "tokens_per_s") }] }),
  ];
}

function generations(history) {
  const evaluated = history.filter((e) => e.generations && e.generations.length).reverse();
  if (!evaluated.length) return [];
  return [h("h2", {}, "Answers to eval.prompts"),
    h("table", { class: "answers" }, h("thead", {}, h("tr", {}, h("th", {}, "step"), h("th", {}, "prompt"), h("th", {}, "answer"))),
      h("tbody", {}, evaluated.flatMap((e) => e.generations.map((g) =>
        h("tr", {}, h("td", {}, e.step), h("td", {}, g.prompt), h("td", { class: "answer" }, g.answer))))))];
}

// An evaluation: the model's figures with the base model's beside them (an adapter's evaluation
// scores both), then each prompt's answers side by side.
function evaluationReport(job) {
  const { metrics, base_metrics: base, generations: answers = [], base_generations: baseAnswers = [] } = job.metrics || {};
  const spec = job.spec;
  const scored = h("p", { class: "meta" }, `model ${spec.model.uri}`, spec.adapter ? ` · adapter ${spec.adapter}` : "",
    spec.dataset ? ` · ${spec.split} split of ${spec.dataset}` : "");
  if (!metrics) return [h("h2", {}, "Evaluation"), scored, h("p", { class: "empty" }, "The evaluation has not written its report yet.")];
  const columns = base ? ["fine-tuned", "base model"] : ["model"];
  const cell = (figures, key) => h("td", {}, formatNumber(figures?.[key]));
  const keys = ["eval_loss", "perplexity", "token_accuracy", "sequence_accuracy"];
  return [
    h("h2", {}, "Evaluation"), scored,
    h("table", { class: "facts", id: "evaluation" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), columns.map((c) => h("th", {}, c)))),
      h("tbody", {}, keys.map((key) => h("tr", {}, h("th", {}, key.replaceAll("_", " ")), cell(metrics, key),
        base ? cell(base, key) : "")))),
    answers.length ? h("h3", {}, "Answers to the prompts") : "",
    answers.length ? h("table", { class: "answers" },
      h("thead", {}, h("tr", {}, h("th", {}, "prompt"), columns.map((c) => h("th", {}, c)))),
      h("tbody", {}, answers.map((g, i) => h("tr", {}, h("td", {}, g.prompt), h("td", { class: "answer" }, g.answer),
        base ? h("td", { class: "answer" }, baseAnswers[i]?.answer ?? "") : "")))) : "",
  ];
}

// A training's evaluations (jobs whose spec named it `job:<id>`), each with its figure beside the base model's.
function evaluationsOf(jobs) {
  if (!jobs.length) return [];
  const loss = (figures) => formatNumber(figures?.eval_loss);
  return [h("h2", {}, "Evaluations"),
    h("table", { class: "facts" }, h("thead", {}, h("tr", {}, ["evaluation", "status", "eval loss", "base model's"].map((c) => h("th", {}, c)))),
      h("tbody", {}, jobs.map((e) => h("tr", {}, h("td", {}, h("a", { href: `#/jobs/${e.id}` }, jobName(e))), h("td", {}, badge(e.status)),
        h("td", {}, loss(e.metrics?.metrics)), h("td", {}, loss(e.metrics?.base_metrics))))))];
}

function artifacts(found) {
  const rows = Object.entries(found || {}).filter(([, v]) => v && (!Array.isArray(v) || v.length));
  if (!rows.length) return [];
  return [h("h2", {}, "Artifacts"), h("dl", { class: "artifacts" }, rows.map(([name, value]) => [
    h("dt", {}, name.replaceAll("_", " ")),
    h("dd", {}, Array.isArray(value) ? h("ul", {}, value.map((v) => h("li", {}, h("code", {}, v)))) : h("code", {}, value)),
  ]))];
}

// ---------------------------------------------------------------- a prepared dataset

function datasetReport({ manifest: m, rejects }) {
  const c = m.counts;
  const table = (rows) => h("table", { class: "facts" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
  const trainedShare = m.tokens.all ? ` (${(100 * m.tokens.trainable / m.tokens.all).toFixed(1)}% trained)` : "";
  return [
    h("h2", {}, `Dataset ${m.name} `, badge(m.status.toUpperCase())),
    h("div", { class: "columns" },
      table([["read", c.rows_read], ["accepted", c.accepted], ["rejected", `${c.rejected_total} (invalid ${c.invalid})`],
        ["duplicates", c.duplicates], ["truncated", c.truncated], ["dropped", c.dropped],
        ["samples train / val", `${c.samples.train ?? 0} / ${c.samples.val ?? 0}`]]),
      table([["tokens", `${m.tokens.all}${trainedShare}`],
        ["sample length", Object.entries(m.sample_length).map(([k, v]) => `${k} ${v}`).join(", ") || "–"],
        ["packing", `${m.packing.mode} into rows of ${m.packing.max_seq_length}`],
        ["packed rows train / val", `${m.packing.rows.train ?? 0} / ${m.packing.rows.val ?? 0}`],
        ["packing fill", `${(100 * m.packing.efficiency).toFixed(1)}%`],
        ["template", `${m.template.name}, end of turn ${m.template.eot} (${m.template.eot_source})`],
        ["tokenizer SHA-256", h("code", {}, m.tokenizer.sha256.slice(0, 16))]])),
    ...rejectSection(c.rejected, rejects),
    ...exampleSection(m.examples || []),
  ];
}

function rejectSection(counts, examples) {
  const reasons = Object.entries(counts).sort((a, b) => b[1] - a[1]);
  if (!reasons.length) return [h("h3", {}, "Rejects"), h("p", { class: "empty" }, "No row was rejected.")];
  return [h("h3", {}, "Rejects by reason"), h("div", { id: "rejects" }, reasons.map(([reason, count]) =>
    h("details", { class: "reject", "data-reason": reason }, h("summary", {}, `${reason}: ${count}`),
      (examples[reason] || []).map((r) => h("div", { class: "reject-row" },
        h("p", { class: "meta" }, `${r.path || r.source}:${r.line}${r.detail ? ` · ${r.detail}` : ""}`),
        h("pre", {}, r.raw)))))),
  ];
}

function exampleSection(examples) {
  if (!examples.length) return [];
  return [h("h3", {}, "Rendered examples"),
    h("p", { class: "hint" }, "Highlighted tokens are trained; the rest are context (label -100)."),
    ...examples.map((segments, i) => h("pre", { class: "example", "data-example": i },
      segments.map((s) => (s.trained ? h("mark", { class: "trained" }, s.text) : s.text))))];
}

// ---------------------------------------------------------------- runs compared

function comparePage(ids) {
  const chart = h("div", { class: "charts" });
  const summary = h("tbody");
  const node = h("section", { class: "compare" }, h("h1", {}, "Compare runs"),
    ids.length < 2 ? h("p", { class: "hint" }, "Tick two or more trainings or pipelines in the ", h("a", { href: "#/jobs" }, "job list"),
      ", then press Compare.") : "",
    chart,
    h("table", {}, h("thead", {}, h("tr", {}, ["run", "status", "steps", "last loss", "best eval loss", "tokens/s"].map((t) => h("th", {}, t)))), summary));

  async function refresh() {
    if (ids.length < 2) return false;
    const runs = await Promise.all(ids.map(async (id) => {
      const job = await api(`jobs/${id}`);
      return { job, history: await optional(api(`jobs/${id}/metrics`), []) };
    }));
    const label = ({ job }) => `${jobName(job)} (${job.id.slice(0, 8)})`;
    chart.replaceChildren(
      lineChart({ id: "chart-compare-loss", title: "Training loss", series: runs.map((r) => ({ name: label(r), points: curve(r.history, "loss") })) }),
      lineChart({ id: "chart-compare-eval", title: "Eval loss", series: runs.map((r) => ({ name: label(r), points: curve(r.history, "eval_loss") })) }));
    summary.replaceChildren(...runs.map((r) => {
      const evals = curve(r.history, "eval_loss").map((p) => p[1]);
      const last = r.history.at(-1) || {};
      return h("tr", {}, h("td", {}, h("a", { href: `#/jobs/${r.job.id}` }, label(r))), h("td", {}, badge(r.job.status)),
        h("td", {}, last.step ?? "–"), h("td", {}, formatNumber(last.loss)),
        h("td", {}, evals.length ? formatNumber(Math.min(...evals)) : "–"), h("td", {}, formatNumber(last.tokens_per_s, 5)));
    }));
    return runs.some((r) => isActive(r.job));
  }
  return { node, refresh };
}

// ---------------------------------------------------------------- small pieces

function jobName(job) {
  return job.spec.name || job.spec.training?.name || "";
}

function badge(status) {
  return h("span", { class: `badge ${status.toLowerCase()}` }, status);
}

function progressBar(percent) {
  const done = h("span", { class: "done" });
  done.style.width = `${percent ?? 0}%`;
  return h("span", { class: "progress", title: percent === null || percent === undefined ? "" : `${percent}%` },
    done, h("span", { class: "percent" }, percent === null || percent === undefined ? "–" : `${Math.round(percent)}%`));
}

signOut.addEventListener("click", () => {
  apiKey.clear();
  compared.clear();
  route();
});
window.addEventListener("hashchange", route);
route();
