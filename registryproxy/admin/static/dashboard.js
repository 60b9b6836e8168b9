// regproxy's dashboard: reads the admin API every few seconds and draws it.
// No library: the DOM, fetch and a hand-drawn SVG.  The token lives in this
// tab's sessionStorage and goes in the Authorization header, never in a URL.
"use strict";
(() => {
  const KEY = "regproxy-admin-token";
  const EVERY_MS = 3000;
  // the images table: the largest SHOWN of those matching the search, asked
  // of the API (which sorts, filters and cuts), SEARCH_MS after the last key;
  // else again when the cache's counts change (on a busy cache they change
  // at every refresh: CHANGED_MS after the last ask at the soonest), or
  // IMAGES_MS after the last ask (for the times of last pull): sizing every
  // repository is the listing's most costly query on a large cache
  const SHOWN = 50;
  const SEARCH_MS = 250;
  const CHANGED_MS = 10000;
  const IMAGES_MS = 30000;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let view = "hour";
  let repositories = [];
  let busy = false;
  let searchTimer = null;
  // each ask for the images is numbered: only the latest one's answer is shown
  let asked = 0;
  // the cache's counts at the last refresh's ask, and when that was
  let imagesCounts = null;
  let imagesAt = 0;

  class Unauthorized extends Error {}

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + (sessionStorage.getItem(KEY) || "") };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) throw new Unauthorized();
    const text = await response.text();
    const data = text ? JSON.parse(text) : null;
    if (!response.ok) {
      throw new Error(data && data.error ? data.error.message : `${response.status} ${path}`);
    }
    return data;
  }

  // -- formatting ----------------------------------------------------------
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
  }
  const percent = (r) => (r === null || r === undefined ? "–" : (r * 100).toFixed(1) + " %");
  const count = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));
  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "never");
  function ago(t, now) {
    if (!t) return "no answer yet";
    const s = Math.max(0, Math.round(now - t));
    return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
  }

  // the shown text, and the exact value in data-value (for scripts and tests)
  function show(id, value, text) {
    const el = $(id);
    el.textContent = text;
    el.dataset.value = value === null || value === undefined ? "" : String(value);
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    if (text instanceof Node) td.append(text); else td.textContent = text;
    if (cls) td.className = cls;
    row.append(td);
    return td;
  }

  function fill(tbody, items, make, empty, columns) {
    const rows = items.map((item) => {
      const tr = document.createElement("tr");
      make(tr, item);
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      cell(tr, empty, "muted").colSpan = columns;
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  function button(text, label, onclick, cls) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    if (cls) b.className = cls;
    b.addEventListener("click", onclick);
    return b;
  }

  function say(text, bad) {
    const m = $("message");
    m.textContent = text;
    m.className = bad ? "error" : "";
  }

  // -- the sections ----------------------------------------------------------
  function renderTotals(stats) {
    const s = stats.cluster ? stats.cluster.summed : stats;
    show("hit-ratio", s.hit_ratio, percent(s.hit_ratio));
    show("bytes-from-cache", s.bytes_from_cache, bytes(s.bytes_from_cache));
    show("bytes-from-upstream", s.bytes_from_upstream, bytes(s.bytes_from_upstream));
    show("requests", s.requests, count(s.requests));
    show("hits", s.hits, count(s.hits));
    show("misses", s.misses, count(s.misses));
    const errors = Object.values(stats.errors || {}).reduce((a, b) => a + b, 0);
    show("errors", errors, count(errors));
  }

  // the change of each counter between samples: one bar or point each
  function deltas(samples) {
    const out = [];
    for (let i = 1; i < samples.length; i += 1) {
      const a = samples[i - 1];
      const b = samples[i];
      const d = (k) => Math.max(0, b[k] - a[k]);
      const looked = d("hits") + d("misses");
      out.push({
        time: b.time,
        ratio: looked ? d("hits") / looked : null,
        cache: d("bytes_from_cache"),
        upstream: d("bytes_from_upstream"),
      });
    }
    return out;
  }

  function svgEl(name, attrs) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    return el;
  }

  function renderCharts(history, stats) {
    const samples = (view === "hour" ? history.hour : history.day).slice();
    const now = { time: Date.now() / 1000 };
    for (const k of ["requests", "hits", "misses", "bytes_from_cache", "bytes_from_upstream"]) now[k] = stats[k];
    samples.push(now);
    const points = deltas(samples);
    // the period, or less if regproxy started since: the chart is never mostly empty
    const period = view === "hour" ? 3600 : 86400;
    const end = now.time;
    const span = Math.max(60, Math.min(period, end - (samples.length ? samples[0].time : end)));
    // drawn at the size shown, so that nothing is stretched
    const W = Math.max(100, Math.round($("chart-ratio").getBoundingClientRect().width) || 600);
    for (const id of ["chart-ratio", "chart-bytes"]) $(id).setAttribute("viewBox", `0 0 ${W} 120`);
    const x = (t) => Math.max(0, W * (1 - (end - t) / span));
    const label = span < period ? `the last ${Math.round(span / 60)} minutes` : view === "hour" ? "the last hour" : "the last day";

    const ratio = $("chart-ratio");
    const grid = [30, 60, 90].map((y) => svgEl("line", { x1: 0, x2: W, y1: y, y2: y, class: "grid" }));
    const known = points.filter((p) => p.ratio !== null);
    const line = svgEl("polyline", {
      class: "ratio",
      points: known.map((p) => `${x(p.time).toFixed(1)},${(115 - 110 * p.ratio).toFixed(1)}`).join(" "),
    });
    const dots = known.map((p) =>
      svgEl("circle", { class: "dot", cx: x(p.time).toFixed(1), cy: (115 - 110 * p.ratio).toFixed(1), r: 3 }));
    ratio.replaceChildren(...grid, line, ...dots);
    const last = known.length ? known[known.length - 1].ratio : null;
    ratio.setAttribute("aria-label", `Hit ratio over ${label}: ${known.length} samples, latest ${percent(last)}`);

    const chart = $("chart-bytes");
    const most = Math.max(1, ...points.map((p) => p.cache + p.upstream));
    const width = Math.max(2, W * (view === "hour" ? history.interval : history.day_interval) / span - 1);
    const bars = [];
    for (const p of points) {
      const hc = (110 * p.cache) / most;
      const hu = (110 * p.upstream) / most;
      const left = Math.max(0, x(p.time) - width);
      if (hc) bars.push(svgEl("rect", { class: "cache", x: left, width, y: 120 - hc, height: hc }));
      if (hu) bars.push(svgEl("rect", { class: "upstream", x: left, width, y: 120 - hc - hu, height: hu }));
    }
    chart.replaceChildren(...bars);
    const cached = points.reduce((a, p) => a + p.cache, 0);
    const fetched = points.reduce((a, p) => a + p.upstream, 0);
    chart.setAttribute("aria-label", `Bytes over ${label}: ${bytes(cached)} from cache, ${bytes(fetched)} from upstream`);
  }

  function renderUpstreams(stats, upstreams) {
    const now = Date.now() / 1000;
    const states = stats.upstreams || {};
    const names = Object.keys(upstreams).sort();
    fill($("upstreams"), names, (tr, name) => {
      const state = states[name] || {};
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = name;
      th.title = upstreams[name].url;
      tr.append(th);
      const fresh = state.last_answer && now - state.last_answer < 300;
      const reach = cell(tr, state.breaker_open ? "no" : fresh ? "yes" : "unknown");
      reach.title = "last answered " + ago(state.last_answer, now);
      reach.className = state.breaker_open ? "bad" : fresh ? "good" : "muted";
      cell(tr, state.breaker_open ? "open: not asked" : "closed", state.breaker_open ? "bad" : "");
      const left = (stats.ratelimit_remaining || {})[name];
      cell(tr, left === undefined ? "–" : count(left), "num");
      const kinds = (stats.upstream_requests || {})[name] || {};
      const total = Object.values(kinds).reduce((a, b) => a + b, 0);
      const td = cell(tr, count(total), "num");
      td.title = Object.entries(kinds).map(([k, v]) => `${k}: ${v}`).join(", ");
      const errors = (stats.upstream_errors || {})[name] || 0;
      const bad = cell(tr, count(errors), errors ? "num bad" : "num");
      bad.dataset.value = String(errors);
    }, "no upstreams", 6);
  }

  function renderFetching(stats) {
    let downloads = (stats.fetching || []).map((f) => ({ ...f, node: null }));
    if (stats.cluster) {
      downloads = [];
      for (const node of stats.cluster.nodes) {
        for (const f of node.fetching || []) downloads.push({ ...f, node: node.name });
      }
    }
    fill($("fetching"), downloads, (tr, f) => {
      cell(tr, (f.repositories || []).join(", ") || "–");
      cell(tr, f.digest.slice(0, 19) + "…", "digest").title = f.digest;
      const p = document.createElement("progress");
      p.max = f.size || 1;
      p.value = f.size ? f.written : 0;
      p.setAttribute("aria-label", `${f.digest.slice(0, 19)}: ${bytes(f.written)} of ${bytes(f.size)}`);
      const td = cell(tr, p);
      td.append(` ${bytes(f.written)} of ${bytes(f.size)}`);
      cell(tr, f.clients === undefined ? "–" : count(f.clients), "num");
      cell(tr, f.node ? `${f.origin} (node ${f.node})` : f.origin);
    }, "nothing downloading now", 5);
  }

  function renderCache(stats) {
    const c = stats.cache || {};
    const meter = $("cache-meter");
    const budget = c.max_bytes || c.size_bytes + c.free_disk_bytes || 1;
    meter.max = budget;
    meter.value = c.size_bytes || 0;
    const of = c.max_bytes ? `of ${bytes(c.max_bytes)} (cache.max_size)` : "(no budget set)";
    show("cache-size", c.size_bytes, `${bytes(c.size_bytes)} ${of}; ${bytes(c.free_disk_bytes)} free on disk`);
    $("cache-counts").textContent =
      `${count(c.repositories)} repositories, ${count(c.tags)} tags, ${count(c.manifests)} manifests, ${count(c.blobs)} blobs`;
  }

  const searchTerm = () => $("search").value.trim().slice(0, 512);

  // the images to show: their page of the listing, and a function that
  // keeps them if no later ask was made meanwhile
  async function askImages() {
    const mine = ++asked;
    const term = searchTerm();
    const query = `sort=size&n=${SHOWN}` + (term ? "&q=" + encodeURIComponent(term) : "");
    const page = await api("GET", "/api/v1/cache?" + query);
    return () => {
      if (mine === asked) repositories = page.repositories;
    };
  }

  async function search() {
    try {
      (await askImages())();
      renderImages();
    } catch (e) {
      if (e instanceof Unauthorized) return signOut("The token was refused: sign in again.");
      $("updated").textContent = "Update failed: " + e.message;
    }
  }

  function renderImages() {
    fill($("images"), repositories, (tr, r) => {
      const name = `${r.upstream}/${r.repository}`;
      tr.dataset.image = name;
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = name;
      tr.append(th);
      cell(tr, bytes(r.size), "num").dataset.value = String(r.size);
      cell(tr, count(r.tags), "num");
      cell(tr, when(r.last_access));
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.append(
        button("Pin", `Pin ${name}`, () => pin(r)),
        button("Purge", `Purge ${name}`, () => purge(r), "danger"),
      );
      cell(tr, actions);
    }, searchTerm() ? "no cached image matches" : "nothing cached yet", 5);
  }

  function renderTopPulls(stats) {
    fill($("top-pulls"), stats.top_pulls || [], (tr, p) => {
      tr.dataset.image = p.image;
      const th = document.createElement("th");
      th.scope = "row";
      th.className = "digest";
      th.textContent = p.image;
      tr.append(th);
      cell(tr, count(p.pulls), "num").dataset.value = String(p.pulls);
    }, "nothing pulled since start-up", 2);
  }

  function renderPins(pins) {
    const items = pins.map((p) => {
      const li = document.createElement("li");
      li.textContent = p.image + (p.source === "config" ? " (cache.pinned in the config)" : " ");
      if (p.source === "api") li.append(button("Unpin", `Unpin ${p.image}`, () => unpin(p.image)));
      return li;
    });
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = "nothing pinned";
      items.push(li);
    }
    $("pins").replaceChildren(...items);
  }

  function renderJobs(stats) {
    const jobs = (stats.prefetch || []).slice().reverse().slice(0, 20);
    fill($("jobs"), jobs, (tr, j) => {
      cell(tr, `${j.upstream}/${j.repository}:${j.reference}`);
      cell(tr, j.error ? `${j.state}: ${j.error}` : j.state, j.state === "failed" ? "bad" : "");
      cell(tr, `${j.blobs_done} of ${j.blobs_total}`, "num");
      cell(tr, bytes(j.bytes_fetched), "num");
    }, "no prefetch jobs", 4);
  }

  function renderErrors(errors) {
    const recent = errors.slice().reverse().slice(0, 50);
    fill($("recent-errors"), recent, (tr, e) => {
      cell(tr, when(e.time));
      cell(tr, String(e.status), "num");
      cell(tr, e.client);
      cell(tr, `${e.method} ${e.path}`, "digest");
    }, "no errors", 4);
  }

  // -- actions ------------------------------------------------------------------
  const repoPath = (r) =>
    `/api/v1/cache/${encodeURIComponent(r.upstream)}/${r.repository.split("/").map(encodeURIComponent).join("/")}`;

  async function act(work) {
    try {
      say(await work(), false);
      await refresh();
    } catch (e) {
      if (e instanceof Unauthorized) return signOut("The token was refused: sign in again.");
      say(e.message, true);
    }
  }

  function purge(r) {
    const name = `${r.upstream}/${r.repository}`;
    if (!window.confirm(`Purge ${name} from the cache? Its next pull fetches it from ${r.upstream} again.`)) return;
    act(async () => {
      const result = await api("DELETE", repoPath(r));
      repositories = repositories.filter((x) => x !== r);
      renderImages();
      return `Purged ${name}: ${result.manifests} manifests, ${bytes(result.bytes_freed)} freed.`;
    });
  }

  // one pin of the whole repository: a pin per tag asked for the repository's
  // whole detail and wrote the pins file once per tag
  function pin(r) {
    const name = `${r.upstream}/${r.repository}`;
    if (!window.confirm(`Pin ${name}, all of its tags? Eviction will not remove it.`)) return;
    act(async () => {
      await api("PUT", "/api/v1/pins", { image: name });
      return `Pinned ${name}.`;
    });
  }

  function unpin(image) {
    if (!window.confirm(`Unpin ${image}? Eviction may then remove it.`)) return;
    act(async () => {
      await api("DELETE", "/api/v1/pins?image=" + encodeURIComponent(image));
      return `Unpinned ${image}.`;
    });
  }

  // -- refreshing, signing in and out ---------------------------------------------
  async function refresh() {
    if (busy) return;
    busy = true;
    clearTimeout(timer);
    try {
      const [stats, history, errors, pins, upstreams] = await Promise.all([
        api("GET", "/api/v1/stats"),
        api("GET", "/api/v1/history"),
        api("GET", "/api/v1/errors"),
        api("GET", "/api/v1/pins"),
        api("GET", "/api/v1/upstreams"),
      ]);
      const c = stats.cache || {};
      const counts = JSON.stringify([c.size_bytes, c.blobs, c.manifests, c.tags, c.repositories]);
      const since = Date.now() - imagesAt;
      if ((counts !== imagesCounts && since >= CHANGED_MS) || since >= IMAGES_MS) {
        (await askImages())();
        imagesCounts = counts;
        imagesAt = Date.now();
      }
      $("login-section").hidden = true;
      $("dashboard").hidden = false;
      $("logout").hidden = false;
      renderTotals(stats);
      renderCharts(history, stats);
      renderUpstreams(stats, upstreams.upstreams);
      renderFetching(stats);
      renderCache(stats);
      renderImages();
      renderTopPulls(stats);
      renderPins(pins.pins);
      renderJobs(stats);
      renderErrors(errors.errors);
      $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "true";
    } catch (e) {
      if (e instanceof Unauthorized) {
        signOut("The token was refused (401): check regproxy's admin.token.");
        return;
      }
      $("updated").textContent = "Update failed: " + e.message;
    } finally {
      busy = false;
    }
    if (sessionStorage.getItem(KEY)) timer = setTimeout(refresh, EVERY_MS);
  }

  function signOut(why) {
    clearTimeout(timer);
    sessionStorage.removeItem(KEY);
    delete document.body.dataset.loaded;
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("login-section").hidden = false;
    $("login-error").textContent = why || "";
    $("token").value = "";
    $("token").focus();
  }

  function setView(v) {
    view = v;
    $("view-hour").setAttribute("aria-pressed", String(v === "hour"));
    $("view-day").setAttribute("aria-pressed", String(v === "day"));
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, $("token").value.trim());
      $("login-error").textContent = "";
      refresh();
    });
    $("logout").addEventListener("click", () => signOut(""));
    $("search").addEventListener("input", () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(search, SEARCH_MS);
    });
    $("view-hour").addEventListener("click", () => setView("hour"));
    $("view-day").addEventListener("click", () => setView("day"));
    $("prefetch").addEventListener("submit", (event) => {
      event.preventDefault();
      const image = $("prefetch-image").value.trim();
      act(async () => {
        const job = await api("POST", "/api/v1/prefetch", { image });
        $("prefetch-image").value = "";
        return `Prefetching ${job.upstream}/${job.repository}:${job.reference} (job ${job.id}).`;
      });
    });
    if (sessionStorage.getItem(KEY)) refresh(); else signOut("");
  });
})();
