// The platform's page: plain JavaScript over the HTTP API of deploy/app.py (no framework, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);

// Distinct colours for class ids 1, 2, ... (Okabe-Ito, readable by colour-blind users).
const PALETTE = [
  [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66],
  [0, 114, 178], [213, 94, 0], [204, 121, 167], [153, 153, 153],
];
const classColour = (id) => PALETTE[(Math.max(id, 1) - 1) % PALETTE.length];
const rgb = ([r, g, b], a = 1) => `rgba(${r}, ${g}, ${b}, ${a})`;

// ------------------------------------------------------------------------------------------ COCO RLE
// pycocotools' compressed RLE string -> run lengths (rleFrString in its maskApi.c): 5-bit groups with a
// continuation bit, the sign bit in the last group, and every count after the second stored as the
// difference from the count two before.
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++;
      k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// A COCO RLE ({size: [h, w], counts}) -> row-major Uint8Array of h*w (1 inside). RLE runs go down the
// columns (Fortran order), starting with a run of zeros.
function decodeRle(rle) {
  const [h, w] = rle.size;
  const counts = typeof rle.counts === "string" ? rleCounts(rle.counts) : rle.counts;
  const mask = new Uint8Array(h * w);
  let i = 0;
  counts.forEach((n, j) => {
    if (j % 2) for (let q = i; q < i + n; q++) mask[(q % h) * w + Math.floor(q / h)] = 1;
    i += n;
  });
  return mask;
}

// ------------------------------------------------------------------------------------------ requests
// A server started with a token answers the API 401 without it: the page asks once, keeps it for this
// tab (sessionStorage) and sends it with every request. A request that failed with an older token than
// the one stored meanwhile (another request asked) just retries.
async function api(url, options = {}) {
  const send = (token) => {
    const headers = { ...options.headers, ...(token ? { Authorization: `Bearer ${token}` } : {}) };
    return fetch(url, { ...options, headers });
  };
  const sent = sessionStorage.getItem("token");
  const response = await send(sent);
  if (response.status !== 401) return response;
  if (sessionStorage.getItem("token") === sent) {
    const token = prompt("This server asks for an access token:");
    if (!token) return response;
    sessionStorage.setItem("token", token.trim());
  }
  return send(sessionStorage.getItem("token"));
}

// The file as the raw body, labelled as bytes (the server refuses unlabelled uploads and reads the format
// from the bytes themselves; browsers know no type for .nii).
async function post(path, file, params = {}) {
  const url = new URL(path, location.href);
  for (const [key, value] of Object.entries(params)) {
    for (const v of [].concat(value)) url.searchParams.append(key, v);
  }
  const headers = { "Content-Type": "application/octet-stream" };
  return api(url, { method: "POST", body: file, headers });
}

async function errorOf(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function status(id, text, isError = false) {
  $(id).textContent = text;
  $(id).classList.toggle("error", isError);
}

// Shows `file` in `img`; formats the browser cannot draw (TIFF) go through /v1/preview.
function showImage(img, file) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = async () => {
      img.onerror = () => reject(new Error("the image could not be shown"));
      const response = await post("/v1/preview", file);
      if (!response.ok) return reject(new Error(await errorOf(response)));
      img.src = URL.createObjectURL(await response.blob());
    };
    img.src = URL.createObjectURL(file);
  });
}

const isVolume = (file) => /\.nii(\.gz)?$/i.test(file.name);

function download(name, text, type) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  a.click();
  URL.revokeObjectURL(a.href);
}

function fileInput(dropId, inputId, onFile) {
  const drop = $(dropId), input = $(inputId);
  input.addEventListener("change", () => input.files[0] && onFile(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) onFile(e.dataTransfer.files[0]);
  });
}

function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// ----------------------------------------------------------------------------------- segment & count
const seg = { file: null, result: null, masks: [] };

async function segment(file) {
  seg.file = file;
  seg.result = null;
  $("seg-coco").disabled = $("seg-csv").disabled = true;
  $("seg-overlay").dataset.drawn = "";
  status("seg-status", `Segmenting ${file.name} ...`);
  const started = performance.now();
  try {
    // every instance, filtered here by the slider, which starts at the model's own operating point
    const asked = post("/v1/segment", file, { score_threshold: 0 });
    const [response] = await Promise.all([asked, showImage($("seg-image"), file)]);
    if (!response.ok) throw new Error(await errorOf(response));
    seg.result = await response.json();
    $("seg-threshold").value = seg.result.operating_point;
  } catch (e) {
    status("seg-status", `${file.name}: ${e.message}`, true);
    return;
  }
  seg.masks = seg.result.instances.map((inst) => decodeRle(inst.mask));
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const { detector } = seg.result.models;
  status("seg-status", `${file.name}: ${seg.result.count} instances in ${seconds} s ` +
    `(${seg.result.tiles} tile${seg.result.tiles > 1 ? "s" : ""}; ${detector.name} version ${detector.version})`);
  $("seg-coco").disabled = $("seg-csv").disabled = false;
  drawSegmentation();
}

const visible = () => {
  const threshold = Number($("seg-threshold").value);
  return seg.result.instances.map((inst, i) => [inst, i]).filter(([inst]) => inst.score >= threshold);
};

// Filtering by score happens here, on the instances already received: moving the slider re-draws,
// it never re-runs the model.
function drawSegmentation() {
  $("seg-threshold-value").value = Number($("seg-threshold").value).toFixed(2);
  if (!seg.result) return;
  const { width, height } = seg.result;
  const canvas = $("seg-overlay");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const shown = visible();
  if ($("seg-show-masks").checked) {
    const pixels = ctx.createImageData(width, height);
    for (const [inst, i] of shown) {
      const [r, g, b] = classColour(inst.class_id);
      const mask = seg.masks[i];
      for (let p = 0; p < mask.length; p++) {
        if (mask[p]) pixels.data.set([r, g, b, 110], 4 * p);
      }
    }
    ctx.putImageData(pixels, 0, 0);
  }
  const line = Math.max(1, Math.round(width / 500));
  ctx.lineWidth = line;
  ctx.font = `${6 * line + 6}px sans-serif`;
  for (const [inst] of shown) {
    const [x0, y0, x1, y1] = inst.box;
    ctx.strokeStyle = ctx.fillStyle = rgb(classColour(inst.class_id));
    if ($("seg-show-boxes").checked) ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    if ($("seg-show-scores").checked) ctx.fillText(inst.score.toFixed(2), x0, Math.max(y0 - line, 8));
  }
  fillCounts(shown);
  canvas.dataset.drawn = String(shown.length);
}

function fillCounts(shown) {
  const counts = Object.fromEntries(Object.keys(seg.result.counts).map((name) => [name, 0]));
  for (const [inst] of shown) counts[inst.class] = (counts[inst.class] || 0) + 1;
  const ids = Object.fromEntries(seg.result.categories.map((c) => [c.name, c.id]));
  const body = $("seg-counts").tBodies[0];
  body.replaceChildren(...Object.entries(counts).map(([name, n]) => {
    const row = document.createElement("tr");
    row.dataset.class = name;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = rgb(classColour(ids[name] || 1));
    const label = document.createElement("td");
    label.append(swatch, name);
    const count = document.createElement("td");
    count.className = "count";
    count.textContent = n;
    row.append(label, count);
    return row;
  }));
  $("seg-total").textContent = shown.length;
}

// The instances above the slider's threshold, as a COCO results file with its image and categories.
function cocoJson() {
  const { width, height, categories } = seg.result;
  const annotations = visible().map(([inst], k) => {
    const [x0, y0, x1, y1] = inst.box;
    return {
      id: k + 1, image_id: 1, category_id: inst.class_id, segmentation: inst.mask, area: inst.area,
      bbox: [x0, y0, x1 - x0, y1 - y0], iscrowd: 0, score: inst.score,
    };
  });
  const images = [{ id: 1, file_name: seg.file.name, width, height }];
  return JSON.stringify({ images, categories, annotations });
}

function csvRows() {
  const quote = (v) => (/[",\n]/.test(String(v)) ? `"${String(v).replaceAll('"', '""')}"` : String(v));
  const rows = [["image", "id", "class", "class_id", "score", "x0", "y0", "x1", "y1", "area"]];
  visible().forEach(([inst], k) => {
    rows.push([seg.file.name, k + 1, inst.class, inst.class_id, inst.score.toFixed(4),
      ...inst.box.map((v) => v.toFixed(1)), inst.area]);
  });
  return rows.map((r) => r.map(quote).join(",")).join("\n") + "\n";
}

const stem = () => seg.file.name.replace(/\.[^.]+$/, "");

function setUpSegment() {
  fileInput("seg-drop", "seg-file", segment);
  for (const id of ["seg-threshold", "seg-show-masks", "seg-show-boxes", "seg-show-scores"]) {
    $(id).addEventListener("input", drawSegmentation);
  }
  $("seg-coco").addEventListener("click", () =>
    download(`${stem()}_instances.json`, cocoJson(), "application/json"));
  $("seg-csv").addEventListener("click", () => download(`${stem()}_instances.csv`, csvRows(), "text/csv"));
}

// ------------------------------------------------------------------------------------------ classify
const cls = { file: null, request: 0 };

async function classify() {
  const file = cls.file;
  if (!file) return;
  const request = ++cls.request; // a newer file or setting wins over answers still on their way
  const volume = isVolume(file);
  const crop = $("cls-crop").checked && !volume;
  const sensitivity = $("cls-sensitivity").value;
  $("cls-sensitivity-value").value = Number(sensitivity).toFixed(2);
  status("cls-status", `Classifying ${file.name} ...`);
  try {
    if (crop) {
      const preview = await post("/v1/crop", file, { sensitivity });
      if (!preview.ok) throw new Error(await errorOf(preview));
      if (request !== cls.request) return;
      $("cls-preview").src = URL.createObjectURL(await preview.blob());
      $("cls-preview").title = `crop box ${preview.headers.get("X-Crop-Box")}`;
    }
    const response = await post("/v1/classify", file, { top_k: 5, crop, sensitivity });
    if (!response.ok) throw new Error(await errorOf(response));
    const result = await response.json();
    if (request !== cls.request) return;
    showTop(result.top);
    const { classifier } = result.models;
    const what = volume ? `volume ${result.shape.join(" x ")}, ${result.slices.length} slices, ` +
      `aggregated by ${result.aggregate}` : file.name;
    status("cls-status", `${what}: ${classifier.name} version ${classifier.version}` +
      ` — predicted ${result.predicted} (${decisionText(result.decision)})`);
  } catch (e) {
    if (request === cls.request) {
      $("cls-top").replaceChildren();
      status("cls-status", `${file.name}: ${e.message}`, true);
    }
  }
}

// The classifier's decision follows its operating point (a cut-off chosen on validation), not the top bar.
function decisionText(decision) {
  if (!decision || decision.rule === "argmax") return "highest probability";
  if (decision.rule === "cut-off") return `${decision.class} when its probability >= ${decision.threshold.toFixed(3)}`;
  return "class weights chosen on validation";
}

function showTop(top) {
  $("cls-top").replaceChildren(...top.map(({ class: name, probability }) => {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = name;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(100 * probability).toFixed(1)}%`;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * probability).toFixed(1)} %`;
    item.append(label, bar, value);
    return item;
  }));
}

async function chooseForClassify(file) {
  cls.file = file;
  const volume = isVolume(file);
  for (const id of ["cls-original", "cls-preview"]) {
    $(id).closest("figure").hidden = volume;
    $(id).removeAttribute("src");
  }
  $("cls-preview").closest("figure").hidden = volume || !$("cls-crop").checked;
  if (!volume) {
    try {
      await showImage($("cls-original"), file);
    } catch (e) {
      status("cls-status", `${file.name}: ${e.message}`, true);
      return;
    }
  }
  classify();
}

function setUpClassify() {
  fileInput("cls-drop", "cls-file", chooseForClassify);
  const again = debounce(classify, 200);
  $("cls-sensitivity").addEventListener("input", () => {
    $("cls-sensitivity-value").value = Number($("cls-sensitivity").value).toFixed(2);
    again();
  });
  $("cls-crop").addEventListener("change", () => {
    $("cls-preview").closest("figure").hidden = !$("cls-crop").checked || !cls.file || isVolume(cls.file);
    classify();
  });
}

// --------------------------------------------------------------------------------------- find in 3D
async function loadLibrary() {
  const response = await api("/v1/library");
  if (!response.ok) {
    status("match-library", await errorOf(response), true);
    $("match-drop").hidden = $("match-restrict").hidden = true;
    return;
  }
  const library = await response.json();
  status("match-library", `Library: ${library.volumes.length} volumes, ${library.slices} slices ` +
    `(every ${library.step === 1 ? "" : `${library.step}th `}slice of each axis).`);
  $("match-volumes").replaceChildren(...library.volumes.map((v) => {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = v.name;
    box.addEventListener("change", chosenChanged);
    label.append(box, ` ${v.name} (${v.shape.join(" x ")})`);
    return label;
  }));
}

const chosenVolumes = () => [...$("match-volumes").querySelectorAll("input:checked")].map((b) => b.value);

function chosenChanged() {
  const n = chosenVolumes().length;
  $("match-chosen").textContent = n ? `${n} chosen` : "all";
}

async function findIn3d(file) {
  status("match-status", `Searching for ${file.name} ...`);
  $("match-results").replaceChildren();
  const query = new Image();
  try {
    await showImage(query, file);
    const params = { top_k: $("match-k").value, volume: chosenVolumes() };
    const response = await post("/v1/match", file, params);
    if (!response.ok) throw new Error(await errorOf(response));
    const result = await response.json();
    status("match-status", `${result.matches.length} best of ${result.searched} slices ` +
      `in ${result.seconds.toFixed(2)} s.`);
    $("match-results").replaceChildren(...result.matches.map((m, k) => matchCard(m, k, query.src)));
  } catch (e) {
    status("match-status", `${file.name}: ${e.message}`, true);
  }
}

function matchCard(m, rank, querySrc) {
  const card = document.createElement("article");
  card.className = "match";
  const view = (kind) => {
    const img = document.createElement("img");
    const params = new URLSearchParams({ volume: m.volume, axis: m.axis, index: m.index, kind });
    // fetched, not linked: an <img> cannot send the token
    api(`/v1/library/view?${params}`).then(async (response) => {
      if (response.ok) img.src = URL.createObjectURL(await response.blob());
    });
    img.alt = `${kind} of ${m.volume}`;
    return img;
  };
  const figure = (content, caption) => {
    const f = document.createElement("figure");
    const c = document.createElement("figcaption");
    c.textContent = caption;
    f.append(content, c);
    return f;
  };
  // The query turned by the found angle (counter-clockwise; CSS turns clockwise for positive angles).
  // Scaled to 71 % so the turned corners stay inside the frame.
  const turned = document.createElement("img");
  turned.src = querySrc;
  turned.style.transform = `rotate(${-m.angle}deg) scale(0.71)`;
  const query = document.createElement("div");
  query.className = "turn";
  query.append(turned);
  const title = document.createElement("h3");
  title.textContent = `${rank + 1}. ${m.volume}, axis ${m.axis}, slice ${m.index} of ${m.shape[m.axis]}`;
  const facts = document.createElement("p");
  facts.textContent = `score ${m.score.toFixed(3)} · SSIM ${m.ssim.toFixed(3)} · NCC ${m.ncc.toFixed(3)} · ` +
    `Dice ${m.dice.toFixed(3)} · ORB ${m.orb_matches} · rotation ${m.angle.toFixed(1)}° counter-clockwise`;
  const row = document.createElement("div");
  row.className = "figures";
  row.append(figure(query, "query, rotated"), figure(view("slice"), "library slice"),
    figure(view("position"), `position: ${(100 * m.position).toFixed(0)} % along axis ${m.axis}`));
  card.append(title, facts, row);
  return card;
}

function setUpMatch() {
  fileInput("match-drop", "match-file", findIn3d);
  $("match-filter").addEventListener("input", () => {
    const text = $("match-filter").value.toLowerCase();
    for (const label of $("match-volumes").children) {
      label.hidden = !label.textContent.toLowerCase().includes(text);
    }
  });
}

// -------------------------------------------------------------------------------------------- models
async function loadModels() {
  const [health, models] = await Promise.all([fetch("/healthz"), api("/v1/models")]);
  if (!models.ok) {
    status("models-status", await errorOf(models), true);
    return;
  }
  const served = (await models.json()).models;
  const h = health.ok ? await health.json() : {};
  status("models-status", `${served.length} model${served.length === 1 ? "" : "s"} serving` +
    (h.library ? "; slice library loaded." : "."));
  $("models-table").tBodies[0].replaceChildren(...served.map(modelRow));
}

// One served model: its headline measures beside the classical baseline's, the data they were measured
// on and its MLflow run; every logged metric stays one hover away (the cell's title).
function modelRow(m) {
  const row = document.createElement("tr");
  const cell = (text) => {
    const td = document.createElement("td");
    td.textContent = text ?? "";
    row.append(td);
    return td;
  };
  const number = (v) => Number(v).toFixed(4);
  cell(m.role);
  cell(m.name);
  cell(m.version);
  cell(m.aliases.join(", "));
  const measures = cell((m.headline || []).map((h) =>
    `${h.name} ${number(h.value)}` + (h.baseline == null ? "" : ` (baseline ${number(h.baseline)})`)).join(" · "));
  measures.title = Object.entries(m.metrics).map(([k, v]) => `${k} ${Number(v).toPrecision(4)}`).join("\n");
  const data = m.validation;
  cell(data ? `${data.name}: ` + Object.entries(data.profile).map(([k, v]) => `${v} ${k}`).join(", ") : "");
  const run = cell(m.run_url ? "" : m.run_id);
  if (m.run_url) {
    const link = document.createElement("a");
    link.href = m.run_url;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = m.run_id;
    run.append(link);
  }
  return row;
}

// ---------------------------------------------------------------------------------------------- tabs
function showTab(name) {
  if (!document.getElementById(name)?.classList.contains("panel")) name = "segment";
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== name;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  history.replaceState(null, "", `#${name}`);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => showTab(tab.dataset.tab));
  }
  setUpSegment();
  setUpClassify();
  setUpMatch();
  loadLibrary();
  loadModels();
  showTab(location.hash.slice(1));
});
// Links and the back button change only the hash: show that tab.
window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));

// For the page's tests: the RLE decoder is checked against pycocotools.
window.foram = { decodeRle, rleCounts };
