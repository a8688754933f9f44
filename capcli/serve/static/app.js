// The capcli web page: each dropped or picked photo is one POST /v1/captions, shown as a card.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
let model = null;

async function loadModel() {
  const line = $("#model");
  try {
    const response = await fetch("/v1/model");
    model = await response.json();
    const m = model.manifest;
    line.textContent = `${model.name} · ${m.backbone} · vocabulary ${m.vocab_size} words · ` +
      `${model.providers[0].replace("ExecutionProvider", "")}`;
  } catch (error) {
    line.textContent = `cannot reach the server: ${error}`;
  }
}

function formOptions() {
  const form = $("#options");
  const fields = {};
  for (const name of ["beam_size", "n_best"]) fields[name] = form.elements[name].value;
  if (Number(fields.n_best) > Number(fields.beam_size)) fields.n_best = fields.beam_size;
  if (!form.elements.guidance.checked) fields.guidance = "false";
  // Constrained search needs guidance and beam search: the box is only sent where it can apply.
  const searching = !form.elements.sample.checked && Number(fields.beam_size) > 1;
  if (form.elements.constrain.checked && form.elements.guidance.checked && searching) fields.constrain = "true";
  if (form.elements.sample.checked) {
    fields.sample = "true";
    for (const name of ["temperature", "top_k", "seed"]) fields[name] = form.elements[name].value;
  }
  return fields;
}

function newCard(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  const img = $("img", card);
  img.addEventListener("error", () => card.classList.add("no-preview"), { once: true });
  img.src = URL.createObjectURL(file);
  $(".filename", card).textContent = file.name;
  $("#results").prepend(card);
  return card;
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("failed");
  $(".caption", card).textContent = message;
}

function showResult(card, result, timings) {
  card.classList.remove("pending");
  $(".caption", card).textContent = result.caption;
  $(".score", card).textContent = `score ${result.score.toFixed(3)} (mean log-probability per word)`;
  const list = $(".alternatives", card);
  for (const alt of result.alternatives.slice(1)) {
    const item = document.createElement("li");
    const score = document.createElement("span");
    score.className = "s";
    score.textContent = alt.score.toFixed(3);
    item.append(alt.caption, score);
    list.append(item);
  }
  if (result.classes) $(".classes", card).textContent = describeClasses(result.classes);
  if (result.attention) drawAttention($(".attention", card), $("img", card), result);
  $(".timings", card).textContent = `${timings.total.toFixed(0)} ms: read ${timings.read.toFixed(0)}, ` +
    `queue ${timings.queue.toFixed(0)}, encoder ${timings.encode.toFixed(0)}, decoder ${timings.decode.toFixed(0)}`;
}

// What the backbone's classifier saw, and the words it steered the caption to or held back.
function describeClasses(seen) {
  const parts = [];
  if (seen.classes.length) {
    parts.push("classifier: " + seen.classes.map((c) => `${c.name} ${Math.round(100 * c.p)} %`).join(", "));
  }
  const boosted = Object.keys(seen.boosted);
  if (boosted.length) parts.push("steered to: " + boosted.join(", "));
  if (seen.required) parts.push("required: " + seen.required);
  if (seen.ruled_out.length) parts.push("held back: " + seen.ruled_out.join(", "));
  return parts.join("; ");
}

// Attention bundles return, per generated word, weights over the encoder's grid of positions.
function gridShape(positions) {
  const m = (model && model.manifest) || {};
  const grid = (m.attention && m.attention.grid) || m.grid;
  if (grid && grid.height && grid.width) return [grid.height, grid.width];
  if (Array.isArray(grid) && grid.length >= 2) return grid.slice(-2);
  const side = Math.round(Math.sqrt(positions));
  return side * side === positions ? [side, side] : [1, positions];
}

function drawAttention(box, img, result) {
  const words = result.caption.split(" ").concat(["<end>"]);
  const draw = () => result.attention.forEach((weights, i) => {
    const flat = weights.flat(Infinity);
    const [rows, cols] = gridShape(flat.length);
    const heat = document.createElement("canvas");
    heat.width = cols;
    heat.height = rows;
    const pixels = heat.getContext("2d").createImageData(cols, rows);
    const top = Math.max(...flat) || 1;
    flat.forEach((w, p) => pixels.data.set([255, 196, 0, Math.round(230 * w / top)], p * 4));
    heat.getContext("2d").putImageData(pixels, 0, 0);
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 144;
    const ctx = canvas.getContext("2d");
    const side = Math.min(img.naturalWidth, img.naturalHeight);
    ctx.filter = "brightness(55%)";
    ctx.drawImage(img, (img.naturalWidth - side) / 2, (img.naturalHeight - side) / 2, side, side, 0, 0, 144, 144);
    ctx.filter = "none";
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(heat, 0, 0, 144, 144);
    const figure = document.createElement("figure");
    const label = document.createElement("figcaption");
    label.textContent = words[i] || "";
    figure.append(canvas, label);
    box.append(figure);
  });
  if (img.complete) draw(); else img.addEventListener("load", draw, { once: true });
}

async function caption(file) {
  const card = newCard(file);
  const body = new FormData();
  body.append("images", file, file.name);
  for (const [name, value] of Object.entries(formOptions())) body.append(name, value);
  try {
    const response = await fetch("/v1/captions", { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) return showError(card, answer.error || `HTTP ${response.status}`);
    showResult(card, answer.results[0], answer.timings_ms);
  } catch (error) {
    showError(card, `request failed: ${error}`);
  }
}

function captionAll(files) {
  for (const file of files) caption(file);
}

function setUp() {
  const drop = $("#drop");
  const input = $("#files");
  input.addEventListener("change", () => { captionAll(input.files); input.value = ""; });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    captionAll(event.dataTransfer.files);
  });
  const form = $("#options");
  form.elements.sample.addEventListener("change", () => form.classList.toggle("sampling-on", form.elements.sample.checked));
  loadModel();
}

setUp();
