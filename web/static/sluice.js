// Sluice dashboard: progressive enhancement of server-rendered pages.
// Every page works without this file; it adds local times, live updates over
// Server-Sent Events, bulk selection and the retry / revoke buttons.
// No inline handlers and no inline styles, so a strict CSP holds.
"use strict";

(function () {
  const body = document.body;
  const csrfToken = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const CSRF_HEADER = "X-CSRF-Token";

  // -- times in the viewer's timezone ----------------------------------------

  const pad = (n) => String(n).padStart(2, "0");
  const zoneName = (() => {
    const part = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" })
      .formatToParts(new Date())
      .find((p) => p.type === "timeZoneName");
    return part ? part.value : "";
  })();

  function localText(date, precise) {
    const ms = precise ? `.${String(date.getMilliseconds()).padStart(3, "0")}` : "";
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
      `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}${ms} ${zoneName}`;
  }

  function localize(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      if (el.dataset.local) return;
      const date = new Date(el.getAttribute("datetime"));
      if (isNaN(date)) return;
      el.title = el.textContent; // keep the UTC text at hand
      el.textContent = localText(date, el.hasAttribute("data-precise"));
      el.dataset.local = "1";
    });
    root.querySelectorAll("text[data-ts]").forEach((el) => {
      const date = new Date(Number(el.dataset.ts) * 1000);
      el.textContent = `${pad(date.getHours())}:${pad(date.getMinutes())}`;
    });
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 60) return `${seconds.toFixed(2)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  }

  // Same wording as the server's "age" filter.
  function age(seconds) {
    if (seconds < 60) return `${Math.round(seconds)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function tickAges() {
    const now = Date.now();
    document.querySelectorAll(".age[data-since]").forEach((el) => {
      const since = new Date(el.dataset.since).getTime();
      if (!isNaN(since)) el.textContent = age(Math.max(0, now - since) / 1000);
    });
  }

  // -- live updates ---------------------------------------------------------------

  const status = document.getElementById("live-status");

  // limit: the most job rows the page shows. The stream sends at most that many a
  // window (a few a second), the newest, each job in its latest state.
  function connect(kinds, onMessage, limit) {
    const params = new URLSearchParams(body.dataset.streamQuery || "");
    params.set("limit", String(limit));
    if (body.dataset.page === "jobs") {
      // The stream takes the list's filters: live rows match what the page shows.
      new URLSearchParams(location.search).forEach((value, key) => {
        if (value && key !== "cursor" && key !== "limit") params.set(key, value);
      });
    }
    // Events stored between the page's rendering and this connection are replayed.
    if (body.dataset.streamFrom) params.set("last_event_id", body.dataset.streamFrom);
    const query = params.toString();
    const source = new EventSource(body.dataset.stream + (query ? `?${query}` : ""));
    status.hidden = false;
    source.addEventListener("open", () => {
      status.classList.remove("down");
      status.textContent = "Live";
    });
    source.addEventListener("error", () => {
      status.classList.add("down");
      status.textContent = "Reconnecting…";
    });
    kinds.forEach((kind) =>
      source.addEventListener(kind, (event) => onMessage(kind, JSON.parse(event.data)))
    );
    // The server dropped us for falling behind: what is on screen may be stale.
    source.addEventListener("resync", () => location.reload());
    return source;
  }

  function setField(row, name, text) {
    const el = row.querySelector(`[data-field="${name}"]`);
    if (el) el.textContent = text;
    return el;
  }

  function fillRow(row, job) {
    const link = row.querySelector('[data-field="link"]');
    link.href = document.getElementById("jobs-table").dataset.jobUrl.replace("JOB_ID", encodeURIComponent(job.id));
    link.textContent = job.id.slice(0, 8);
    link.title = job.id;
    setField(row, "name", job.name || "—");
    setField(row, "exception", job.exception || "");
    const state = setField(row, "state", job.state);
    state.className = `badge state-${job.state}`;
    setField(row, "queue", job.queue || "—");
    setField(row, "worker", job.worker || "—");
    setField(row, "runtime", duration(job.runtime));
    setField(row, "retries", String(job.retries));
    const created = row.querySelector('[data-field="created_at"]');
    if (job.created_at && !created.querySelector("time")) {
      const time = document.createElement("time");
      time.setAttribute("datetime", job.created_at);
      created.replaceChildren(time);
      time.textContent = localText(new Date(job.created_at));
      time.dataset.local = "1";
    }
    const checkbox = row.querySelector(".job-select");
    if (checkbox) checkbox.value = job.id;
    row.dataset.jobId = job.id;
  }

  // The list's total counts a job created since it was counted; an older one that
  // arrives live (its row was on a later page) was counted already.
  function countNew(job) {
    const total = document.getElementById("jobs-total");
    if (!total || !job.created_at || Date.parse(job.created_at) < Number(total.dataset.countedAt)) return;
    addToTotal(total, 1);
  }

  function addToTotal(total, count) {
    const n = Number(total.dataset.total) + count;
    const atMost = Number(total.dataset.atMost);
    total.dataset.total = String(n);
    total.textContent = n > atMost ? `${atMost.toLocaleString("en-US")}+` : n.toLocaleString("en-US");
    document.getElementById("jobs-total-noun").textContent = n === 1 ? "job" : "jobs";
  }

  function liveJobs() {
    const tbody = document.getElementById("jobs-body");
    const template = document.getElementById("job-row-template");
    // The page keeps as many rows as it was rendered for: the stream keeps those up to date.
    const pageSize = Number(body.dataset.liveJobs);
    const source = connect(["job"], (_kind, job) => {
      let row = tbody.querySelector(`tr[data-job-id="${CSS.escape(job.id)}"]`);
      if (!row) {
        row = template.content.firstElementChild.cloneNode(true);
        tbody.prepend(row);
        countNew(job);
        document.querySelector(".table-card .empty-state")?.remove();
        while (tbody.rows.length > pageSize) tbody.lastElementChild.remove();
      }
      fillRow(row, job);
      row.classList.remove("flash");
      void row.offsetWidth; // restart the highlight animation
      row.classList.add("flash");
      updateBulk();
    }, pageSize);
    // Jobs the stream left out, beyond the page: those stored for the first time still count.
    source.addEventListener("skipped", (event) => {
      const total = document.getElementById("jobs-total");
      const skipped = JSON.parse(event.data);
      if (total && skipped.new) addToTotal(total, skipped.new);
    });
  }

  // Pages made of regions re-fetch themselves (debounced) when something they show changed.
  function liveRegions(kinds) {
    let timer = null;
    let last = 0;
    async function refresh() {
      timer = null;
      last = Date.now();
      const response = await fetch(location.href, { headers: { Accept: "text/html" } });
      if (!response.ok) return;
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      document.querySelectorAll("[data-refresh][id]").forEach((region) => {
        const fresh = doc.getElementById(region.id);
        if (fresh) {
          region.replaceWith(fresh);
          localize(fresh);
        }
      });
      tickAges();
    }
    function schedule() {
      if (timer) return;
      timer = setTimeout(refresh, Math.max(500, 3000 - (Date.now() - last)));
    }
    // One job row a window is enough to know that the page changed.
    connect(kinds, schedule, 1);
    setInterval(schedule, 30000);
  }

  // -- actions ----------------------------------------------------------------------

  function post(url, payload) {
    return api(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", [CSRF_HEADER]: csrfToken },
      body: JSON.stringify(payload),
    });
  }

  // The API's JSON answer, or an Error with the message of its error.
  async function api(url, init = {}) {
    const response = await fetch(url, { ...init, credentials: "same-origin" });
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      // a proxy's HTML error page: fall back to the status line below
    }
    if (!response.ok) {
      const message = data?.error?.message || `${response.status} ${response.statusText}`;
      throw new Error(message);
    }
    return data;
  }

  function showResult(el, ok, text) {
    el.className = `action-result ${ok ? "ok" : "error"}`;
    el.textContent = text;
  }

  function selectedIds() {
    return Array.from(document.querySelectorAll(".job-select:checked"), (box) => box.value);
  }

  function updateBulk() {
    const ids = selectedIds();
    document.getElementById("bulk-count").textContent = `${ids.length} selected`;
    document.querySelectorAll("[data-bulk]").forEach((button) => (button.disabled = !ids.length));
    const all = document.querySelectorAll(".job-select");
    const selectAll = document.getElementById("select-all");
    selectAll.checked = all.length > 0 && ids.length === all.length;
    selectAll.indeterminate = ids.length > 0 && ids.length < all.length;
  }

  // The bulk answer: {"results": [{"id", "outcome", "message", "new_job_id"}]}.
  function summarize(action, data) {
    const results = data?.results || [];
    const counts = {};
    results.forEach((r) => (counts[r.outcome] = (counts[r.outcome] || 0) + 1));
    const parts = Object.entries(counts).map(([outcome, n]) => `${n} ${outcome}`);
    const problem = results.find((r) => r.outcome !== "accepted" && r.message);
    const detail = problem ? `: ${problem.message}` : "";
    return `${action}: ${parts.join(", ") || "nothing to do"}${detail}`;
  }

  // A bulk retry's dry run as a question: what goes where, and what would be refused.
  function bulkRetryQuestion(retries) {
    const going = {};
    retries.filter((r) => r.publish).forEach(({ publish: p }) => {
      const line = `${p.name} to queue ${p.queue} on ${where(p)}`;
      going[line] = (going[line] || 0) + 1;
    });
    const refused = retries.filter((r) => r.refused);
    const lines = [`Retry ${retries.length} job(s)? Sluice will publish:`];
    Object.entries(going).forEach(([line, n]) => lines.push(`${n} × ${line}`));
    const unplanned = retries.length - refused.length - Object.values(going).reduce((a, b) => a + b, 0);
    if (unplanned) lines.push(`${unplanned} × as the framework's plugin decides`);
    if (refused.length) lines.push(`Refused, not published: ${refused.length}, e.g. ${refused[0].refused}`);
    return lines.join("\n");
  }

  function bulkSelection() {
    const bar = document.getElementById("bulk-bar");
    const result = document.getElementById("bulk-result");
    bar.hidden = false;
    document.getElementById("jobs-body").addEventListener("change", updateBulk);
    document.getElementById("select-all").addEventListener("change", (event) => {
      document.querySelectorAll(".job-select").forEach((box) => (box.checked = event.target.checked));
      updateBulk();
    });
    document.querySelectorAll("[data-bulk]").forEach((button) =>
      button.addEventListener("click", async () => {
        const action = button.dataset.bulk;
        const ids = selectedIds();
        let question = `Revoke ${ids.length} job(s)?`;
        if (action === "retry") {
          try {
            const dry = await post("/api/jobs/bulk", { action, ids, dry_run: true });
            question = bulkRetryQuestion(dry.retries || []);
          } catch (error) {
            showResult(result, false, error.message);
            return;
          }
        }
        if (!confirm(question)) return;
        button.disabled = true;
        try {
          const data = await post("/api/jobs/bulk", { action, ids });
          const ok = (data?.results || []).every((r) => r.outcome === "accepted");
          showResult(result, ok, summarize(action, data));
        } catch (error) {
          showResult(result, false, error.message);
        } finally {
          updateBulk();
        }
      })
    );
    updateBulk();
  }

  // The broker a retry goes to, and the remote agent that publishes it there, if any.
  function where(plan) {
    return plan.agent ? `${plan.broker}, through agent ${plan.agent}` : plan.broker;
  }

  // What the retry would publish, asked before it is: the user confirms the job name,
  // queue, broker and arguments, not just "again". Throws the reason it would be refused.
  async function retryQuestion(url) {
    const plan = (await api(url))?.publish;
    if (!plan) return "Run this job again, as a new job with the same arguments?";
    return [
      "Run this job again as a new job? Sluice will publish:",
      `${plan.name} to queue ${plan.queue} on ${where(plan)}`,
      `arguments ${plan.arguments}`,
      `(from ${plan.arguments_from})`,
      ...plan.details,
    ].join("\n");
  }

  // A plugin's own action's options, as its inputs on the job page hold them; an empty
  // field is left out (its default applies).
  function optionsOf(action) {
    const payload = {};
    document.querySelectorAll(`[data-option-of="${CSS.escape(action)}"]`).forEach((input) => {
      const type = input.dataset.type;
      if (type === "boolean") payload[input.dataset.option] = input.checked;
      else if (input.value !== "") {
        payload[input.dataset.option] = type === "integer" || type === "number" ? Number(input.value) : input.value;
      }
    });
    return payload;
  }

  function jobActions() {
    const result = document.getElementById("action-result");
    const terminate = document.getElementById("revoke-terminate");
    document.querySelectorAll("[data-action], [data-action-option]").forEach((el) => (el.hidden = false));
    document.querySelectorAll("[data-action]").forEach((button) =>
      button.addEventListener("click", async () => {
        const action = button.dataset.action;
        let question;
        try {
          if (action === "retry") question = await retryQuestion(button.dataset.url);
          else if (action === "revoke") {
            question = terminate.checked ? "Revoke this job, and kill it if it is running?" : "Revoke this job?";
          } else question = `${button.dataset.title} this job?\n${button.dataset.help}`;
        } catch (error) {
          showResult(result, false, error.message); // refused: nothing to confirm
          return;
        }
        if (!confirm(question)) return;
        button.disabled = true;
        try {
          const payload = action === "revoke" ? { terminate: terminate.checked }
            : action === "retry" ? {} : optionsOf(action);
          const data = await post(button.dataset.url, payload);
          if (action === "retry" && data?.job_id) {
            result.className = "action-result ok";
            result.replaceChildren("Retry sent as ");
            const link = document.createElement("a");
            link.href = document.location.pathname.replace(/[^/]+$/, encodeURIComponent(data.job_id));
            link.textContent = data.job_id;
            result.append(link);
          } else {
            const done = button.dataset.title ? `${button.dataset.title} done` : "Done";
            showResult(result, true, action === "revoke" ? "Revoke sent" : done);
          }
        } catch (error) {
          showResult(result, false, error.message);
        } finally {
          button.disabled = false;
        }
      })
    );
  }

  // -- alerts ---------------------------------------------------------------------------

  // A call to the alerts API: POST (or data-method), with data-payload's JSON, or with
  // "until" data-until's select (seconds from now) sets. The page reloads to show what
  // changed; a channel's test shows its receipt instead.
  async function alertCall(button) {
    const result = button.parentElement.querySelector(".action-result");
    if (button.dataset.confirm && !confirm(button.dataset.confirm)) return;
    let payload = button.dataset.payload ? JSON.parse(button.dataset.payload) : {};
    if (button.dataset.until) {
      const seconds = Number(document.getElementById(button.dataset.until).value);
      payload = { until: Date.now() / 1000 + seconds };
    }
    button.disabled = true;
    try {
      const data = await api(button.dataset.url, {
        method: button.dataset.method || "POST",
        headers: { "Content-Type": "application/json", [CSRF_HEADER]: csrfToken },
        body: JSON.stringify(payload),
      });
      if ("showReceipt" in button.dataset) showResult(result, true, `Sent: ${data.receipt}`);
      else location.reload();
    } catch (error) {
      showResult(result, false, error.message);
    } finally {
      button.disabled = false;
    }
  }

  // Set body[a][b] for the field name "a.b".
  function setPath(target, path, value) {
    const keys = path.split(".");
    const last = keys.pop();
    keys.forEach((key) => (target = target[key] ??= {}));
    target[last] = value;
  }

  // A form's fields as the API's JSON body: data-type says how a value reads; empty
  // fields and those of another kind or type (disabled) are left out.
  function formBody(form) {
    const payload = {};
    for (const el of form.elements) {
      if (!el.name || el.matches(":disabled")) continue;
      const type = el.dataset.type;
      if (type === "ids") {
        const ids = payload[el.name] ??= [];
        if (el.type === "checkbox" && el.checked) ids.push(Number(el.value));
      } else if (type === "boolean") setPath(payload, el.name, el.checked);
      else if (el.value.trim() === "") continue;
      else if (type === "number") setPath(payload, el.name, Number(el.value));
      else if (type === "list") setPath(payload, el.name, el.value.split(",").map((v) => v.trim()).filter(Boolean));
      else if (type === "json") {
        try {
          setPath(payload, el.name, JSON.parse(el.value));
        } catch (error) {
          throw new Error(`${el.name}: not valid JSON (${error.message})`);
        }
      } else setPath(payload, el.name, el.value.trim());
    }
    return payload;
  }

  // Show the fieldsets of the selected kind (or type) only, and send only theirs.
  function switchCases(form) {
    form.querySelectorAll("select[data-switch]").forEach((select) => {
      const update = () => form.querySelectorAll(`[data-case-of="${select.dataset.switch}"]`).forEach((set) => {
        set.hidden = set.disabled = set.dataset.case !== select.value;
      });
      select.addEventListener("change", update);
      update();
    });
  }

  function alertControls() {
    document.querySelectorAll("[data-alert-call], [data-alert-js], [data-alert-form]").forEach((el) => (el.hidden = false));
    document.querySelectorAll("[data-alert-call]").forEach((button) =>
      button.addEventListener("click", () => alertCall(button))
    );
    document.querySelectorAll("form[data-alert-form]").forEach((form) => {
      switchCases(form);
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const result = form.querySelector(".action-result");
        const submit = form.querySelector("[type=submit]");
        submit.disabled = true;
        try {
          await post(form.dataset.url, formBody(form));
          location.reload();
        } catch (error) {
          showResult(result, false, error.message);
        } finally {
          submit.disabled = false;
        }
      });
    });
  }

  // -- start ------------------------------------------------------------------------------

  localize(document);
  tickAges();
  setInterval(tickAges, 1000);
  if (body.dataset.page === "jobs") {
    bulkSelection();
    if ("liveJobs" in body.dataset) liveJobs();
  }
  if (body.dataset.page === "job") jobActions();
  if (body.dataset.page?.startsWith("alerts")) alertControls();
  if (body.dataset.liveRefresh) liveRegions(body.dataset.liveRefresh.split(","));
})();
