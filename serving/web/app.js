// The page at GET /: plain JS over the gateway's HTTP API (docs/api.md, /openapi.json). No build step, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
let models = [];

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.error = error;
  }
}

// One API call; a JSON error answer is thrown as the API words it ({code, field, message}).
async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch(path, { method, headers, body: body && JSON.stringify(body) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, data.error || { code: `HTTP ${resp.status}`, message: resp.statusText });
  return data;
}

const png = (b64) => `data:image/png;base64,${b64}`;
const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
const model = () => models.find((m) => m.name === $("model").value);

function showError(where, form, e) {
  const box = $(where);
  box.hidden = false;
  if (!(e instanceof ApiError)) {
    box.textContent = `request failed: ${e.message}`;
    return;
  }
  const err = e.error;
  box.textContent = `${err.code}: ${err.message}` + (err.field ? `\n(field: ${err.field})` : "");
  const input = err.field && $(form).querySelector(`[name="${err.field}"]`);
  if (input) input.classList.add("bad");
  if (e.status === 401) $("auth").hidden = false;
}

function clearError(where, form) {
  $(where).hidden = true;
  $(form).querySelectorAll(".bad").forEach((el) => el.classList.remove("bad"));
}

function options(select, values, labels = values) {
  select.replaceChildren(...values.map((v, i) => new Option(labels[i], v)));
}

function modelChanged() {
  const m = model();
  if (!m) return;
  document.querySelector(".cond").hidden = !m.accepts_digit;
  document.querySelector(".diffusion").hidden = !m.samplers.length;
  $("num_samples").max = m.max_num_samples;
  $("guidance").placeholder = m.accepts_digit ? `${m.default_guidance}` : "";
  options($("sampler"), ["", ...m.samplers], [`default (${m.default_sampler})`, ...m.samplers]);
}

async function loadModels() {
  try {
    models = (await api("GET", "/v1/models")).models;
  } catch (e) {
    showError("generate-error", "generate-form", e);
    return;
  }
  const current = $("model").value;
  options($("model"), models.map((m) => m.name), models.map((m) => (m.ready ? m.name : `${m.name} (not ready)`)));
  if (current) $("model").value = current;
  const denoiser = models.find((m) => m.supports_denoise);
  if (denoiser) options($("denoise-sampler"), ["", ...denoiser.samplers], ["default", ...denoiser.samplers]);
  $("generate-error").hidden = true;
  modelChanged();
}

async function generate(event) {
  event.preventDefault();
  clearError("generate-error", "generate-form");
  const m = model();
  const req = { model: $("model").value, num_samples: number("num_samples"), seed: number("seed"), format: "PNG_GRID" };
  if (m && m.accepts_digit) Object.assign(req, { digit: number("digit"), guidance: number("guidance") });
  if (m && m.samplers.length) Object.assign(req, { sampler: $("sampler").value, steps: number("steps") });
  $("generate").disabled = true;
  try {
    const r = await api("POST", "/v1/generate", req);
    $("grid").src = png(r.images.grid_png);
    const extra = r.sampler ? ` · ${r.sampler}, ${r.steps} steps` : "";
    $("generate-info").textContent = `${r.images.count} from ${r.model} (version ${r.model_version}) · seed ${r.seed}`
      + `${extra} · server time ${r.timing.server_ms.toFixed(1)} ms`;
    $("generate-result").hidden = false;
  } catch (e) {
    showError("generate-error", "generate-form", e);
  } finally {
    $("generate").disabled = false;
  }
}

// The clean digit to denoise, base64 PNG: a new one from the first GAN, or the uploaded file.
async function sourceDigit() {
  if ($("source").value === "upload") {
    const file = $("upload").files[0];
    if (!file) throw new Error("choose a 28x28 PNG file first");
    const bytes = new Uint8Array(await file.arrayBuffer());
    return btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
  }
  const gan = models.find((m) => m.kind === "gan" && m.ready);
  const r = await api("POST", "/v1/generate", { model: gan ? gan.name : "", num_samples: 1, format: "PNG" });
  return r.images.png[0];
}

async function denoise(event) {
  event.preventDefault();
  clearError("denoise-error", "denoise-form");
  $("denoise").disabled = true;
  try {
    const digit = await sourceDigit();
    const r = await api("POST", "/v1/denoise", {
      png_images: [digit], sigma: number("sigma"), steps: number("denoise-steps"),
      sampler: $("denoise-sampler").value, seed: number("denoise-seed"), format: "PNG",
    });
    $("original").src = png(digit);
    $("noisy").src = png(r.noisy.png[0]);
    $("denoised").src = png(r.denoised.png[0]);
    $("denoise-info").textContent = `sigma ${r.sigma} · ${r.sampler}, ${r.steps} steps · seed ${r.seed}`
      + ` · server time ${r.timing.server_ms.toFixed(1)} ms`;
    $("denoise-result").hidden = false;
  } catch (e) {
    showError("denoise-error", "denoise-form", e);
  } finally {
    $("denoise").disabled = false;
  }
}

options($("digit"), ["", ..."0123456789"], ["any", ..."0123456789"]);
$("model").addEventListener("change", modelChanged);
$("source").addEventListener("change", () => { $("upload").hidden = $("source").value !== "upload"; });
$("token").addEventListener("change", loadModels);
$("generate-form").addEventListener("submit", generate);
$("denoise-form").addEventListener("submit", denoise);
loadModels();
