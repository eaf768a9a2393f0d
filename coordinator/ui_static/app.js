// TVM Batch dashboard: a hash-routed page over /ui/api/* and the /ui/events feed.
// Data is written with textContent only (never as HTML): names come from API users.
"use strict";

const $ = (sel) => document.querySelector(sel);
let session = null;
let source = null;
let timers = [];

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = v;
    else if (k === "style") el.style.cssText = v;  // CSSOM, allowed by the CSP (attributes are not)
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const enc = encodeURIComponent;

function fill(el, ...kids) {
  el.replaceChildren(...kids.flat(2).filter((k) => k !== null && k !== undefined));
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
  if (r.status === 401) { location.href = "/ui/login"; throw new Error("not logged in"); }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

async function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "content-type": "application/json", "x-csrf-token": session.csrf },
    body: JSON.stringify(body || {}),
  });
}

function toast(text) {
  const t = $("#toast");
  t.textContent = text;
  t.hidden = false;
  setTimeout(() => { t.hidden = true; }, 4000);
}

function live(view, render) {
  if (source) source.close();
  source = new EventSource("/ui/events?view=" + enc(view));
  source.onopen = () => $("#live").classList.remove("off");
  source.onerror = () => $("#live").classList.add("off");
  source.onmessage = (ev) => render(JSON.parse(ev.data));
}

function plot(series, keys, opts) {
  // series: [{t, key1, key2}], keys: [[key, class, label]]
  const W = 900, H = 180, P = 28;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "plot");
  svg.setAttribute("id", (opts && opts.id) || "plot");
  if (!series.length) {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", 20); t.setAttribute("y", 40); t.textContent = "collecting samples…";
    svg.append(t);
    return svg;
  }
  const t0 = series[0].t, t1 = Math.max(series[series.length - 1].t, t0 + 1);
  let ymax = 1;
  for (const s of series) for (const [k] of keys) if (s[k] !== null && s[k] > ymax) ymax = s[k];
  const x = (t) => P + (W - 2 * P) * (t - t0) / (t1 - t0);
  const y = (v) => H - P - (H - 2 * P) * v / ymax;
  for (const [k, cls, label] of keys) {
    const pl = document.createElementNS(svg.namespaceURI, "polyline");
    pl.setAttribute("class", cls);
    pl.setAttribute("points", series.filter((s) => s[k] !== null).map((s) => `${x(s.t).toFixed(1)},${y(s[k]).toFixed(1)}`).join(" "));
    pl.setAttribute("data-label", label);
    svg.append(pl);
  }
  const mk = (tx, xx, yy, cls) => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", xx); t.setAttribute("y", yy); t.setAttribute("font-size", "11");
    if (cls) t.setAttribute("class", cls);
    t.textContent = tx; svg.append(t);
  };
  mk(String(Math.round(ymax * 100) / 100), 2, P - 6);
  mk("0", 2, H - P + 4);
  mk(`${Math.round(t1 - t0)} s`, W - 60, H - 6);
  keys.forEach(([, cls, label], i) => mk(label, P + 10 + i * 170, 16, cls));
  return svg;
}

function legend() {
  const states = [["idle", "#66bb6a"], ["running", "#1e88e5"], ["starting", "#fbc02d"], ["failed/unusable", "#e53935"], ["leaving", "#8d6e63"]];
  return h("div", { class: "legend" }, states.map(([s, c]) => h("span", { style: `--c:${c}`, text: s })));
}

function card(label, value, id) {
  return h("div", { class: "card" }, h("div", { class: "label", text: label }), h("div", { class: "big", id, text: value }));
}

// ---------------------------------------------------------------- overview

function overview() {
  const main = $("#main");
  fill(main, h("h1", { text: "Overview" }), h("div", { id: "ov" }, h("p", { text: "Loading…" })));
  live("overview", (d) => {
    const ov = h("div", { id: "ov" });
    ov.append(h("div", { class: "cards", id: "totals" },
      card("queued", d.totals.active, "t-active"), card("running", d.totals.running, "t-running"),
      card("done", d.totals.completed, "t-completed"), card("failed", d.totals.failed, "t-failed"),
      card("placements", d.placements, "t-placements")));
    ov.append(h("h2", { text: "Pools" }), legend());
    const pools = h("div", { class: "cards", id: "pools" });
    for (const p of d.pools) {
      const states = Object.entries(p.states).map(([s, n]) => `${n} ${s}`).join(", ") || "no TVMs";
      pools.append(h("div", { class: "card pool", "data-pool": p.name },
        h("a", { href: `#/pool/${enc(p.name)}`, class: "pool-link", text: p.name }),
        h("div", { class: "muted", text: `${p.current}/${p.target} TVMs · ${p.allocationState} · ${states}` }),
        h("div", { class: "heat" }, p.tvms.map(([name, st, running]) =>
          h("div", { class: `cell s-${st}`, "data-state": st, title: `${name}: ${st}, ${running} running` })))));
    }
    if (!d.pools.length) pools.append(h("p", { class: "muted", text: "No pools yet." }));
    ov.append(pools);
    ov.append(h("h2", { text: "Tasks per second (placed, completed)" }),
      plot(d.throughput, [["placed", "k1", "placed/s"], ["completed", "k2", "completed/s"]], { id: "ov-plot" }));
    ov.append(h("h2", { text: `Jobs (${d.jobCount})` }));
    const rows = d.jobs.map((j) => h("tr", {},
      h("td", {}, h("a", { href: `#/job/${enc(j.workitem)}/${enc(j.name)}`, class: "job-link", text: `${j.workitem}/${j.name}` })),
      h("td", { class: "state", text: j.state }), h("td", { text: j.pool }),
      h("td", { text: j.counts.active }), h("td", { text: j.counts.running }),
      h("td", { text: j.counts.succeeded }), h("td", { class: j.counts.failed ? "bad" : "", text: j.counts.failed })));
    ov.append(h("table", { id: "jobs" }, h("tr", {}, ["job", "state", "pool", "queued", "running", "succeeded", "failed"].map((c) => h("th", { text: c }))), rows));
    $("#ov").replaceWith(ov);
  });
}

// ---------------------------------------------------------------- pool

function poolPage(name) {
  const main = $("#main");
  const resize = session.write ? h("div", { class: "row" },
    h("label", { text: "target TVMs " }, h("input", { id: "resize-target", type: "number", min: "0", style: "width:6em" })),
    h("button", { class: "act neutral", id: "resize-btn", type: "button", onclick: async () => {
      const n = parseInt($("#resize-target").value, 10);
      try { await post(`/ui/api/pool/${enc(name)}/resize`, { targetDedicated: n }); toast(`resizing ${name} to ${n}`); }
      catch (e) { toast(`resize failed: ${e.message}`); }
    } }, "Resize")) : null;
  fill(main, h("h1", { text: `Pool ${name}` }), resize, h("div", { id: "pv" }, h("p", { text: "Loading…" })));
  live(`pool:${name}`, (d) => {
    const pv = h("div", { id: "pv" });
    if (d.error) { pv.append(h("p", { class: "error", text: d.error.message })); $("#pv").replaceWith(pv); return; }
    const p = d.pool;
    pv.append(h("dl", {},
      h("dt", { text: "state" }), h("dd", { id: "pool-state", text: `${p.state}, allocation ${p.allocationState}` }),
      h("dt", { text: "TVMs" }), h("dd", { id: "pool-size", text: `${p.currentDedicated} of target ${p.targetDedicated}` }),
      h("dt", { text: "VM size" }), h("dd", { text: `${p.vmSize}, ${p.maxTasksPerVM || p.maxTasksPerVm || ""} task slots per TVM` }),
      h("dt", { text: "resize error" }), h("dd", { text: p.resizeError ? `${p.resizeError.code}: ${p.resizeError.message}` : "none" }),
      h("dt", { text: "autoscale" }), h("dd", { text: p.enableAutoScale ? (p.autoScaleFormula || "") : "off" })));
    pv.append(h("h2", { text: "TVMs" }), legend());
    pv.append(h("div", { class: "heat" }, d.tvms.map((t) => h("div", { class: `cell s-${t.state}`, "data-state": t.state, title: `${t.name}: ${t.state}` }))));
    const rows = d.tvms.map((t) => {
      const st = t.startTask;
      const stText = st ? `${st.state}${st.exitCode !== null && st.exitCode !== undefined ? ` (exit ${st.exitCode})` : ""}${st.schedulingError ? ` ${st.schedulingError.code}` : ""}` : "none";
      return h("tr", { "data-tvm": t.name },
        h("td", { text: t.name }), h("td", { class: "state", text: t.state }),
        h("td", { text: t.schedulingState }), h("td", { class: "running", text: t.runningTasks }),
        h("td", {}, t.recentTasks.map((r) => h("div", {}, h("a", { href: `#/task/${enc(r.workitemName)}/${enc(r.jobName)}/${enc(r.taskName)}`, text: r.taskName })))),
        h("td", { text: t.totalTasksRun }), h("td", { class: st && st.state === "failed" ? "bad" : "", text: stText }),
        h("td", { class: t.degradedModes.length ? "bad" : "", text: t.degradedModes.join("; ") || "none" }),
        h("td", { text: t.hostname }));
    });
    pv.append(h("table", { id: "tvm-table" }, h("tr", {}, ["TVM", "state", "scheduling", "running", "tasks", "run so far", "start task", "degraded modes", "host"].map((c) => h("th", { text: c }))), rows));
    pv.append(h("h2", { text: "Size (target, current) while watched" }),
      plot(d.sizes.map(([t, tg, cur]) => ({ t, target: tg, current: cur })), [["target", "k1", "target"], ["current", "k2", "current"]], { id: "size-plot" }));
    if (d.autoscaleRuns.length) {
      pv.append(h("h2", { text: "Autoscale runs" }),
        plot(d.autoscaleRuns.filter((r) => r.target !== null).map((r) => ({ t: Date.parse(r.timestamp) / 1000, target: r.target })), [["target", "k3", "$TargetDedicated"]], { id: "autoscale-plot" }),
        h("table", { id: "autoscale-runs" }, h("tr", {}, h("th", { text: "time" }), h("th", { text: "results" }), h("th", { text: "error" })),
          d.autoscaleRuns.slice().reverse().map((r) => h("tr", {}, h("td", { text: r.timestamp }), h("td", { text: r.results }), h("td", { class: "bad", text: r.error || "" })))));
    }
    $("#pv").replaceWith(pv);
  });
}

// ---------------------------------------------------------------- job

function jobPage(wi, job) {
  const main = $("#main");
  const st = { state: "all", q: "", page: 0, size: 50, lastLoad: 0, lastCounts: "", pending: null };
  const terminate = session.write ? h("button", { class: "act", id: "terminate-job", type: "button", onclick: async () => {
    if (!confirm(`Terminate job ${wi}/${job}? Its running tasks are killed.`)) return;
    try { await post(`/ui/api/job/${enc(wi)}/${enc(job)}/terminate`); toast("job terminated"); }
    catch (e) { toast(`terminate failed: ${e.message}`); }
  } }, "Terminate job") : null;
  const filter = h("select", { id: "filter", onchange: () => { st.state = filter.value; st.page = 0; load(); } },
    ["all", "failed", "running", "active", "succeeded", "completed"].map((s) => h("option", { value: s, text: s })));
  const search = h("input", { id: "search", placeholder: "task name contains…", oninput: () => { st.q = search.value; st.page = 0; load(); } });
  fill(main,
    h("h1", { text: `Job ${wi}/${job}` }),
    h("div", { class: "row" }, h("span", { id: "job-state", class: "state" }), h("span", { id: "job-pool", class: "muted" }), terminate),
    h("div", { class: "cards", id: "counts" }),
    h("h2", { text: "Tasks (failures first)" }),
    h("div", { class: "row" }, filter, search,
      h("button", { id: "prev", type: "button", onclick: () => { if (st.page > 0) { st.page--; load(); } } }, "‹ prev"),
      h("span", { id: "page-info" }),
      h("button", { id: "next", type: "button", onclick: () => { st.page++; load(); } }, "next ›")),
    h("table", { id: "task-table" }));
  async function load() {
    st.lastLoad = Date.now();
    const d = await api(`/ui/api/tasks/${enc(wi)}/${enc(job)}?state=${st.state}&q=${enc(st.q)}&page=${st.page}&size=${st.size}`);
    const pages = Math.max(1, Math.ceil(d.total / d.size));
    if (st.page >= pages && st.page > 0) { st.page = pages - 1; return load(); }
    $("#page-info").textContent = `page ${d.page + 1} of ${pages} (${d.total} tasks)`;
    fill($("#task-table"),
      h("tr", {}, ["task", "state", "exit code", "failure", "retries", "TVM"].map((c) => h("th", { text: c }))),
      d.tasks.map((t) => h("tr", { class: `k-${t.kind}`, "data-task": t.name },
        h("td", {}, h("a", { href: `#/task/${enc(wi)}/${enc(job)}/${enc(t.name)}`, class: "task-link", text: t.name })),
        h("td", { class: "state", text: t.kind }), h("td", { text: t.exitCode === null ? "" : t.exitCode }),
        h("td", { class: "bad", text: t.failure || "" }), h("td", { text: t.retryCount }), h("td", { text: t.tvm || "" }))));
  }
  load().catch((e) => toast(e.message));
  live(`job:${wi}/${job}`, (d) => {
    if (d.error) { $("#job-state").textContent = d.error.message; return; }
    $("#job-state").textContent = d.state;
    $("#job-pool").textContent = `pool ${d.pool}${d.terminateReason ? ` · ${d.terminateReason}` : ""}`;
    const c = d.counts;
    fill($("#counts"), card("queued", c.active, "c-active"), card("running", c.running, "c-running"),
      card("completed", c.completed, "c-completed"), card("succeeded", c.succeeded, "c-succeeded"), card("failed", c.failed, "c-failed"));
    const key = JSON.stringify(c);
    // The table follows the counts, at most every 3 s (sorting a big job is not free); a change
    // inside that window is picked up when it ends, as the feed may not send again.
    if (key !== st.lastCounts) {
      st.lastCounts = key;
      const wait = 3000 - (Date.now() - st.lastLoad);
      if (wait <= 0) load().catch(() => {});
      else if (!st.pending) {
        st.pending = setTimeout(() => { st.pending = null; load().catch(() => {}); }, wait);
        timers.push(st.pending);
      }
    }
  });
}

// ---------------------------------------------------------------- task

function taskPage(wi, job, task) {
  const main = $("#main");
  const base = `${enc(wi)}/${enc(job)}/${enc(task)}`;
  const terminate = session.write ? h("button", { class: "act", id: "terminate-task", type: "button", onclick: async () => {
    if (!confirm(`Terminate task ${task}?`)) return;
    try { await post(`/ui/api/task/${base}/terminate`); toast("task terminated"); }
    catch (e) { toast(`terminate failed: ${e.message}`); }
  } }, "Terminate task") : null;
  fill(main,
    h("h1", {}, h("a", { href: `#/job/${enc(wi)}/${enc(job)}`, text: `${wi}/${job}` }), ` / ${task}`),
    h("div", { class: "row" }, terminate),
    h("dl", { id: "task-info" }),
    h("h2", { text: "stdout.txt" }), h("pre", { id: "stdout" }),
    h("h2", { text: "stderr.txt" }), h("pre", { id: "stderr" }));
  const tails = { "stdout.txt": { el: "#stdout", offset: null }, "stderr.txt": { el: "#stderr", offset: null } };
  let running = true;
  async function tail() {
    for (const [name, t] of Object.entries(tails)) {
      const q = t.offset === null ? "" : `?offset=${t.offset}`;
      try {
        const d = await api(`/ui/api/file/${base}/${name}${q}`);
        const pre = $(t.el);
        if (!pre) return;
        if (d.note) {
          if (t.offset === null) pre.textContent = d.note;  // e.g. not started yet
          t.noted = true;
        } else if (d.text) {
          pre.textContent = (t.offset === null || t.noted ? "" : pre.textContent) + d.text;
          t.noted = false;
        }
        t.offset = d.next;
        if (d.size > t.offset) setTimeout(tail, 50);  // more than one chunk behind: catch up
      } catch (e) { /* the TVM may be gone; keep what is shown */ }
    }
  }
  tail();
  timers.push(setInterval(() => { if (running) tail(); }, 1000));
  live(`task:${wi}/${job}/${task}`, (d) => {
    const dl = h("dl", { id: "task-info" });
    if (d.error) { dl.append(h("dt", { text: "error" }), h("dd", { class: "bad", text: d.error.message })); $("#task-info").replaceWith(dl); return; }
    const e = d.executionInfo || {};
    const err = e.schedulingError;
    running = d.state !== "completed";
    const add = (k, v, id, cls) => dl.append(h("dt", { text: k }), h("dd", { id, class: cls, text: v === null || v === undefined ? "" : v }));
    add("state", `${d.kind}${d.previousState ? ` (was ${d.previousState})` : ""} since ${d.stateTransitionTime}`, "task-state", d.kind === "failed" ? "bad" : "");
    add("exit code", e.exitCode, "task-exit", e.exitCode ? "bad" : "");
    add("failure", err ? `${err.category} ${err.code}: ${err.message}` : "none", "task-failure", err ? "bad" : "");
    add("TVM", d.tvmInfo ? `${d.tvmInfo.poolName}/${d.tvmInfo.tvmName}` : "not placed", "task-tvm");
    add("started", e.startTime, "task-start");
    add("ended", e.endTime, "task-end");
    add("retries / requeues", `${e.retryCount || 0} / ${e.requeueCount || 0}`);
    add("history", (d.history || []).map((x) => `${x.event} ${x.time}`).join(" → "), "task-history");
    add("command line", d.commandLine, "task-cmd");
    $("#task-info").replaceWith(dl);
  });
}

// ---------------------------------------------------------------- throughput

function throughputPage() {
  const main = $("#main");
  fill(main, h("h1", { text: "Throughput" }), h("div", { id: "tv" }, h("p", { text: "Loading…" })));
  live("throughput", (d) => {
    const last = d.series.slice(-5);
    const avg = (k) => last.length ? (last.reduce((a, s) => a + s[k], 0) / last.length).toFixed(1) : "0";
    const tv = h("div", { id: "tv" },
      h("div", { class: "cards" }, card("placed / s", avg("placed"), "tp-placed"), card("completed / s", avg("completed"), "tp-completed"),
        card("placements", d.placements, "tp-placements"), card("completions", d.completed, "tp-completions")),
      h("h2", { text: "Placements and completions per second" }),
      plot(d.series, [["placed", "k1", "placed/s"], ["completed", "k2", "completed/s"]], { id: "tp-plot" }),
      h("p", { class: "muted", text: "Sampled by the coordinator about once a second (the last 10 minutes)." }));
    $("#tv").replaceWith(tv);
  });
}

// ---------------------------------------------------------------- router

function route() {
  if (source) { source.close(); source = null; }
  timers.forEach(clearInterval); timers = [];
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter((p) => p).map(decodeURIComponent);
  if (parts[0] === "pool" && parts.length === 2) poolPage(parts[1]);
  else if (parts[0] === "job" && parts.length === 3) jobPage(parts[1], parts[2]);
  else if (parts[0] === "task" && parts.length === 4) taskPage(parts[1], parts[2], parts[3]);
  else if (parts[0] === "throughput") throughputPage();
  else overview();
}

async function start() {
  session = await api("/ui/api/session");
  $("#who").textContent = `${session.account}${session.write ? "" : " (read-only)"}`;
  $("#logout").addEventListener("click", async () => {
    try { await post("/ui/logout"); } finally { location.href = "/ui/login"; }
  });
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", start);
