/* fgcli gallery: a static page over an output tree of `fullgrad dump`.
 *
 * Data arrive by <script> (a file:// page may not fetch): gallery/data.js calls
 * fgcliData() with one compact row per image; gallery/records/NNNNN.js call
 * fgcliChunk() with full manifest records and decomposition terms, loaded when the
 * detail view needs them. The grid shows one page of cards at a time, so the DOM stays
 * small whatever the number of images. Everything the page shows from the data goes
 * through textContent or attributes, never innerHTML.
 */
"use strict";

(function () {
  const T0 = performance.now();
  const timing = (window.fgcliTiming = { script: T0 });
  // image row: [key, status, original (1: originalPrefix + key; {href, text} for a name
  //             that is not UTF-8), error, entries]
  // entry row: [id, rank, target, classIndex, prob, logit, residual, stem (null: the key),
  //             mask, paths?]
  const MASK = { overlay: 1, heatmap: 2, map: 4, decomp: 8, thumb: 16 };
  const FOLDER = { overlay: ["overlays/", ".jpg"], heatmap: ["heatmaps/", ".png"],
                   map: ["maps/", ".npy"], decomp: ["decomp/", ".npz"],
                   thumb: ["thumbs/", ".jpg"] };
  const FIRST_THUMBS = 12;
  let data = null;
  let view = [];        // indices into data.images after filter and sort
  let page = 0;
  let detailAt = -1;    // position in view of the open detail, or -1
  let detailRank = 0;
  let typing = 0;       // timer of the search box
  const chunks = new Map();  // chunk number -> Promise of {records, terms}

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function url(path) {
    return path.split("/").map(encodeURIComponent).join("/");
  }

  function outputPath(img, entry, kind) {
    if (!(entry[8] & MASK[kind])) return null;
    if (entry[9] && entry[9][kind]) return entry[9][kind];
    const [folder, suffix] = FOLDER[kind];
    return folder + (entry[7] === null ? img[0] : entry[7]) + suffix;
  }

  function originalPath(img) {
    return img[2] === 1 ? data.originalPrefix + img[0] : img[2];
  }

  const className = (entry) => (entry[3] === null ? "" : data.classes[entry[3]]);
  const pct = (p) => (p === null ? "–" : (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 2 : 1) + "%");
  const num = (x, d) => (x === null || x === undefined ? "–" : Number(x).toPrecision(d));

  // --------------------------------------------------------------------- filter and sort
  function sortValue(kind, img) {
    const top = img[4][0];
    switch (kind) {
      case "prob": return top ? top[4] : -1;
      case "residual":
        return img[4].length ? Math.max(...img[4].map((e) => Math.abs(e[6] || 0))) : -1;
      case "class": return top ? className(top) : "";
      default: return img[0];
    }
  }

  const keyCache = new Map();  // sort kind -> keys of every image (the data never change)
  function sortKeys(kind) {
    if (!keyCache.has(kind)) keyCache.set(kind, data.images.map((img) => sortValue(kind, img)));
    return keyCache.get(kind);
  }

  function applyView(keepPage) {
    const q = $("search").value.trim().toLowerCase();
    const cls = $("class-filter").value;
    const status = $("status-filter").value;
    const kind = $("sort").value;
    const desc = $("descending").checked;
    const out = [];
    data.images.forEach((img, i) => {
      if (status && img[1] !== status) return;
      if (cls !== "" && !(img[4][0] && String(img[4][0][3]) === cls)) return;
      if (q && !img[0].toLowerCase().includes(q)) return;
      out.push(i);
    });
    const keys = sortKeys(kind);  // one key per image, by image number
    const sign = desc ? -1 : 1;   // ties keep path order either way
    out.sort((a, b) => {
      const x = keys[a], y = keys[b];
      return x < y ? -sign : x > y ? sign : a - b;
    });
    view = out;
    if (!keepPage) page = 0;
    render();
  }

  // ----------------------------------------------------------------------------- grid
  function pageSize() { return Number($("page-size").value) || 100; }

  function card(index, position) {
    const img = data.images[index];
    const [key, status, , error, entries] = img;
    const fig = el("figure", { class: "card " + status, "data-key": key, tabindex: 0,
                               "data-position": position });
    const thumbs = el("div", { class: "thumbs" });
    if (status === "failed" || !entries.length) {
      thumbs.append(el("div", { class: "nothumb", text: status }));
    }
    for (const e of entries) {
      const src = outputPath(img, e, "thumb");
      const box = el("div", { class: "thumb" });
      if (src) {
        box.append(el("img", { src: url(src), alt: `${key}: ${className(e)}`, loading: "lazy",
                               decoding: "async", width: 180, height: 180 }));
      } else {
        box.append(el("div", { class: "nothumb", text: "no image" }));
      }
      if (entries.length > 1) box.append(el("span", { class: "rank", text: "#" + e[1] }));
      thumbs.append(box);
    }
    fig.append(thumbs);
    const cap = el("figcaption");
    cap.append(el("div", { class: "key", text: key, title: key }));
    if (status === "failed") {
      cap.append(el("div", { class: "error", text: error || "failed" }));
    } else {
      for (const e of entries) {
        cap.append(el("div", { class: "cls" },
          el("span", { class: "name", text: className(e) || "class " + e[2] }),
          el("span", { class: "prob", text: " " + pct(e[4]) }),
          el("span", { class: "res", title: "completeness residual",
                       text: " r=" + num(e[6], 2) })));
      }
    }
    fig.append(cap);
    fig.addEventListener("click", () => openDetail(position));
    fig.addEventListener("keydown", (ev) => { if (ev.key === "Enter") openDetail(position); });
    return fig;
  }

  function pager(node) {
    node.replaceChildren();
    const pages = Math.max(1, Math.ceil(view.length / pageSize()));
    const go = (p) => { page = Math.min(pages - 1, Math.max(0, p)); render(); };
    const prev = el("button", { type: "button", class: "prev", text: "‹ previous" });
    prev.disabled = page === 0;
    prev.addEventListener("click", () => go(page - 1));
    const next = el("button", { type: "button", class: "next", text: "next ›" });
    next.disabled = page >= pages - 1;
    next.addEventListener("click", () => go(page + 1));
    node.append(prev, el("span", { class: "page", text: ` page ${page + 1} of ${pages} ` }),
                next);
  }

  function render() {
    const size = pageSize();
    const start = page * size;
    const grid = $("grid");
    const cards = view.slice(start, start + size).map((i, k) => card(i, start + k));
    grid.replaceChildren(...cards);
    pager($("pager-top"));
    pager($("pager-bottom"));
    $("status-line").textContent = view.length === data.images.length
      ? `${view.length} images`
      : `${view.length} of ${data.images.length} images match`;
    if (!view.length) grid.append(el("p", { class: "empty", text: "No image matches." }));
    if (timing.grid === undefined) {
      timing.grid = performance.now() - T0;
      watchFirstThumbs(grid);
    }
  }

  function watchFirstThumbs(grid) {
    const imgs = Array.from(grid.querySelectorAll("img")).slice(0, FIRST_THUMBS);
    let left = imgs.length;
    const done = () => {
      if (--left <= 0 && timing.thumbs === undefined) timing.thumbs = performance.now() - T0;
    };
    if (!left) { timing.thumbs = performance.now() - T0; return; }
    for (const im of imgs) {
      if (im.complete) done();
      else { im.addEventListener("load", done); im.addEventListener("error", done); }
    }
  }

  // --------------------------------------------------------------------------- detail
  // A chunk is loaded once: `chunks` holds its promise from the first request on, so a
  // detail view opened while the script is on its way waits for the same load.
  const arrived = new Map();  // chunk number -> resolve() of its pending load
  function loadChunk(n) {
    if (!chunks.has(n)) {
      const name = `gallery/records/${String(n).padStart(5, "0")}.js`;
      chunks.set(n, new Promise((resolve, reject) => {
        const script = el("script", { src: name });
        script.addEventListener("error", () => {
          chunks.delete(n);  // a later view may try again
          reject(new Error(`${name} is missing: rebuild the gallery`));
        });
        arrived.set(n, resolve);
        document.head.append(script);
      }));
    }
    return chunks.get(n);
  }
  window.fgcliChunk = function (n, chunk) {
    const resolve = arrived.get(n);
    arrived.delete(n);
    if (resolve) resolve(chunk);
  };

  async function entryDetail(id) {
    const size = data.chunk;
    const chunk = await loadChunk(Math.floor(id / size));
    return { record: chunk.records[id % size], terms: chunk.terms[id % size] };
  }

  // path: a path in the tree, or {href, text} for an original whose name is not UTF-8
  // (href: its bytes, percent-encoded in Python; a JavaScript string cannot hold them)
  function figure(title, path, note) {
    const fig = el("figure", { class: "full" });
    if (path) {
      const link = typeof path === "object" ? path.href : url(path);
      fig.append(el("a", { href: link, target: "_blank" },
                    el("img", { src: link, alt: title })));
    } else {
      fig.append(el("div", { class: "nothumb", text: note || "not written" }));
    }
    fig.append(el("figcaption", { text: title }));
    return fig;
  }

  function openDetail(position) {
    if (position < 0 || position >= view.length) return;
    detailAt = position;
    detailRank = 0;
    showDetail();
    $("detail").hidden = false;
    if (location.hash !== "#detail") history.pushState(null, "", "#detail");
  }

  function closeDetail() {
    $("detail").hidden = true;
    detailAt = -1;
    if (location.hash === "#detail") history.back();
  }

  async function showDetail() {
    const img = data.images[view[detailAt]];
    const [key, status, , error, entries] = img;
    const original = originalPath(img);
    $("detail-title").textContent = key;
    const body = $("detail-body");
    body.replaceChildren();
    if (status === "failed") {
      body.append(el("p", { class: "error", text: "failed: " + (error || "") }));
    }
    if (entries.length > 1) {
      const tabs = el("div", { class: "ranks" });
      entries.forEach((e, r) => {
        const b = el("button", { type: "button", class: r === detailRank ? "on" : "",
          text: `#${e[1]} ${className(e)} ${pct(e[4])}` });
        b.addEventListener("click", () => { detailRank = r; showDetail(); });
        tabs.append(b);
      });
      body.append(tabs);
      const side = el("div", { class: "side-by-side" });
      for (const e of entries) {
        side.append(figure(`#${e[1]} ${className(e)} (${pct(e[4])})`,
                           outputPath(img, e, "overlay") || outputPath(img, e, "heatmap")));
      }
      body.append(side);
    }
    const e = entries[detailRank];
    const row = el("div", { class: "images" });
    row.append(figure("original", original, "original not found when the gallery was built"));
    if (e) {
      row.append(figure("heatmap", outputPath(img, e, "heatmap")));
      row.append(figure("overlay", outputPath(img, e, "overlay")));
    }
    body.append(row);
    const recordBox = el("pre", { class: "record", id: "detail-record", text: "loading…" });
    const chart = el("div", { class: "chart", id: "detail-chart" });
    body.append(el("h3", { text: "Decomposition" }), chart,
                el("h3", { text: "Manifest record" }), recordBox);
    const id = e ? e[0] : null;
    if (id === null) {
      recordBox.textContent = JSON.stringify({ key, status, error }, null, 2);
      chart.append(el("p", { text: "No map for this image." }));
      return;
    }
    const shown = detailAt;
    let got;
    try {
      got = await entryDetail(id);
    } catch (err) {
      recordBox.textContent = String(err.message || err);
      return;
    }
    if (shown !== detailAt) return;  // the user moved on
    recordBox.textContent = JSON.stringify(got.record, null, 2);
    if (got.terms) chart.append(waterfall(data.layers[got.terms[0]], got.terms[1]));
    else chart.append(el("p", { text: "No decomp/ file for this map (dump with --save …,decomp)." }));
  }

  // A horizontal waterfall: each term's bar starts where the previous one ended, so the
  // last bar ends at the sum; the total bar from 0 is the logit.
  function waterfall(layers, values) {
    const NS = "http://www.w3.org/2000/svg";
    const svgEl = (tag, attrs) => {
      const n = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
      return n;
    };
    const logit = values[values.length - 1];
    const names = ["input", ...layers, "residual"];
    const terms = values.slice(0, values.length - 1);
    let cum = 0;
    const spans = terms.map((v) => { const a = cum; cum += v; return [a, cum]; });
    const sum = cum;
    const ends = spans.flat().concat([0, logit]);
    const lo = Math.min(...ends), hi = Math.max(...ends);
    const W = 760, LABEL = 230, VALUE = 90, ROW = 16, PAD = 6;
    const plotW = W - LABEL - VALUE;
    const x = (v) => LABEL + (hi > lo ? ((v - lo) / (hi - lo)) * plotW : 0);
    const H = (names.length + 1) * ROW + 2 * PAD + 20;
    const svg = svgEl("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`,
                               class: "waterfall", id: "decomp-chart",
                               "data-sum": sum, "data-logit": logit, role: "img" });
    const title = svgEl("title", {});
    title.textContent = "input term + every layer's bias term + residual = logit";
    svg.append(title);
    svg.append(svgEl("line", { x1: x(0), x2: x(0), y1: PAD, y2: H - PAD - 20,
                                class: "zero" }));
    const row = (i, label, a, b, kind, value) => {
      const y = PAD + i * ROW;
      const t = svgEl("text", { x: LABEL - 6, y: y + ROW - 4, "text-anchor": "end",
                                class: "label" });
      t.textContent = label.length > 34 ? "…" + label.slice(-33) : label;
      const full = svgEl("title", {});
      full.textContent = `${label}: ${value}`;
      const rect = svgEl("rect", { x: Math.min(x(a), x(b)), y: y + 2,
                                   width: Math.max(1, Math.abs(x(b) - x(a))),
                                   height: ROW - 4, class: "bar " + kind,
                                   "data-term": label, "data-value": value });
      rect.append(full);
      const v = svgEl("text", { x: W - 4, y: y + ROW - 4, "text-anchor": "end", class: "value" });
      v.textContent = num(value, 4);
      svg.append(t, rect, v);
    };
    names.forEach((n, i) => row(i, n, spans[i][0], spans[i][1],
                                terms[i] >= 0 ? "pos" : "neg", terms[i]));
    row(names.length, "= logit", 0, logit, "total", logit);
    svg.append(svgEl("line", { x1: x(logit), x2: x(logit), y1: PAD, y2: H - PAD - 20,
                                class: "logit" }));
    const foot = svgEl("text", { x: LABEL, y: H - 8, class: "foot", id: "decomp-sum" });
    foot.textContent = `input + Σ ${layers.length} layers + residual = ${num(sum, 7)}` +
                       ` · logit ${num(logit, 7)}`;
    svg.append(foot);
    return svg;
  }

  // ----------------------------------------------------------------------------- eval
  function evalTable(ev) {
    const box = $("eval-table");
    if (!box || !ev) return;
    const methods = Object.keys(ev.results);
    const metrics = Object.keys(ev.results[methods[0]] || {});
    const head = el("tr", {}, el("th", { text: "method" }));
    const cols = [];
    for (const m of metrics) {
      const n = ev.results[methods[0]][m].mean.length;
      for (let j = 0; j < n; j++) {
        const label = n > 1 && ev.ks ? `${m} k=${ev.ks[j]}%` : `${m} AUC`;
        head.append(el("th", { text: label, title: (ev.metrics || {})[m] || "" }));
        cols.push([m, j]);
      }
    }
    const table = el("table", { class: "eval-table" }, el("thead", {}, head));
    const tbody = el("tbody");
    for (const method of methods) {
      const tr = el("tr", {}, el("th", { text: method }));
      for (const [m, j] of cols) {
        const r = (ev.results[method] || {})[m];
        tr.append(el("td", { text: r ? `${num(r.mean[j], 3)} ± ${num(r.se[j], 2)}` : "–" }));
      }
      tbody.append(tr);
    }
    table.append(tbody);
    box.append(el("p", { text: `${ev.images} images; mean ± standard error. ` +
                               "Perturbation and deletion: lower is better; insertion: higher." }),
               table);
    if (ev.plot) box.append(el("img", { src: url(ev.plot), alt: "eval curves", class: "eval-plot" }));
  }

  // ---------------------------------------------------------------------------- start
  window.fgcliData = function (d) {
    data = d;
    timing.data = performance.now() - T0;
    const counts = new Map();
    for (const img of d.images) {
      const top = img[4][0];
      if (top && top[3] !== null) counts.set(top[3], (counts.get(top[3]) || 0) + 1);
    }
    const options = Array.from(counts.entries())
      .sort((a, b) => (d.classes[a[0]] < d.classes[b[0]] ? -1 : 1))
      .map(([c, n]) => el("option", { value: c, text: `${d.classes[c]} (${n})` }));
    const ready = () => {
      $("class-filter").append(...options);
      for (const id of ["search", "class-filter", "status-filter", "sort", "descending",
                        "page-size"]) {
        $(id).addEventListener(id === "search" ? "input" : "change", () => {
          // typing re-filters once it pauses: 100,000 images take ~0.1 s to filter and sort
          clearTimeout(typing);
          typing = setTimeout(() => applyView(false), id === "search" ? 120 : 0);
        });
      }
      $("detail-close").addEventListener("click", closeDetail);
      $("detail-prev").addEventListener("click", () => openDetail(detailAt - 1));
      $("detail-next").addEventListener("click", () => openDetail(detailAt + 1));
      $("detail").addEventListener("click", (ev) => { if (ev.target === $("detail")) closeDetail(); });
      document.addEventListener("keydown", (ev) => {
        if (detailAt < 0) return;
        if (ev.key === "Escape") closeDetail();
        else if (ev.key === "ArrowLeft") openDetail(detailAt - 1);
        else if (ev.key === "ArrowRight") openDetail(detailAt + 1);
      });
      window.addEventListener("popstate", () => {
        if (location.hash !== "#detail" && detailAt >= 0) {
          $("detail").hidden = true;
          detailAt = -1;
        }
      });
      evalTable(d.eval);
      applyView(false);
      document.body.dataset.ready = "1";
    };
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", ready);
    else ready();
  };
})();
