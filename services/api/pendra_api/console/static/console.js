// Pendra's console: what htmx does not do for it. The API key kept for the tab and sent with every
// request, event streams read with fetch (EventSource cannot send the key), install progress,
// the uninstall confirmation, the overview's sparklines and the playground (images included, for a
// model that reads them).
//
// Text from the server or a model is only ever set with textContent, never parsed as HTML.
"use strict";

(() => {
  const KEY = "pendra.apiKey";
  const $ = (id) => document.getElementById(id);
  const page = document.body.dataset.page;

  // -- the API key --------------------------------------------------------------------------------

  const apiKey = () => sessionStorage.getItem(KEY);

  function withKey(headers = {}) {
    const key = apiKey();
    return key ? { ...headers, Authorization: `Bearer ${key}` } : { ...headers };
  }

  function showSignIn() {
    const section = $("signin");
    if (!section.hidden) return;
    if (apiKey()) {
      sessionStorage.removeItem(KEY);
      $("signin-error").textContent = "The saved key was refused; sign in again.";
    }
    section.hidden = false;
    $("page").hidden = true;
    $("signin-key").focus();
  }

  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("signin-key").value.trim();
    const error = $("signin-error");
    error.textContent = "";
    try {
      // Only the key check answers 401: any other answer (even a 503 from a queue that is down)
      // means the key was accepted.
      const response = await fetch("/api/catalogue?q=-", { headers: { Authorization: `Bearer ${key}` } });
      if (response.status === 401) {
        error.textContent = "That key was not accepted.";
        return;
      }
    } catch {
      error.textContent = "Pendra is not answering.";
      return;
    }
    sessionStorage.setItem(KEY, key);
    location.reload();
  });

  $("signout").hidden = !apiKey();
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    location.reload();
  });

  // -- requests ------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: withKey(options.headers) });
    if (response.status === 401) {
      showSignIn();
      throw new ApiError(401, "an API key is needed");
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      let code = null;
      try {
        const body = await response.json();
        message = body.error?.message || message;
        code = body.error?.code || null;
      } catch {
        // not JSON: keep the status
      }
      throw new ApiError(response.status, message, code);
    }
    return response;
  }

  const postJSON = (path, body, options = {}) =>
    api(path, {
      ...options,
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });

  // Server-sent events over fetch: yields {event, data} for each event of the response.
  async function* events(path, options = {}) {
    const response = await api(path, { ...options, headers: { Accept: "text/event-stream", ...options.headers } });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let name = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (data.length) yield { event: name, data: data.join("\n") };
          name = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") name = text;
          else if (field === "data") data.push(text);
        }
      }
    }
  }

  let toastTimer = null;
  function toast(text) {
    const box = $("toast");
    box.textContent = text;
    box.classList.add("shown");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => box.classList.remove("shown"), 6000);
  }

  // -- htmx: the key on every request, a sign-in instead of a broken page ---------------------------

  document.body.addEventListener("htmx:configRequest", (event) => {
    Object.assign(event.detail.headers, withKey());
  });
  document.body.addEventListener("htmx:beforeSwap", (event) => {
    if (event.detail.xhr.status !== 401) return;
    event.detail.shouldSwap = false;
    event.detail.isError = false; // not an error of the page: the server wants a key
    showSignIn();
  });
  document.body.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    let message = `HTTP ${xhr.status}`;
    try {
      message = JSON.parse(xhr.responseText).error.message;
    } catch {
      // not JSON
    }
    toast(`Pendra answered: ${message}`);
  });
  document.body.addEventListener("htmx:sendError", () => toast("Pendra is not answering."));

  // A swap replaces the buttons (and a pressed button is disabled, which drops the focus): keep
  // the keyboard where it was, or on what took its place (Install becomes Cancel, and back), or
  // else on the model's row.
  let lastFocus = null;
  let restoring = false;
  document.addEventListener("focusin", (event) => {
    if (restoring || !event.target.id) return;
    lastFocus = { id: event.target.id, row: event.target.closest("li[id]")?.id || null };
  });

  // Where the keyboard goes once the lists are refreshed after a press: Install hands it to the
  // Cancel that replaces it, and Cancel back to Install, whatever order the swaps settle in.
  let pendingFocus = null;

  function restoreFocus() {
    const pending = pendingFocus && document.getElementById(pendingFocus);
    if (pending && !pending.disabled) {
      pendingFocus = null;
      restoring = true;
      pending.focus();
      restoring = false;
      return;
    }
    const active = document.activeElement;
    if (!lastFocus) return;
    // Somewhere else on the page: leave it. On the row (our fallback, or htmx keeping the id of
    // a replaced row): the button itself or its counterpart is better, once it is there.
    if (active && active !== document.body && active.isConnected && active.id !== lastFocus.row) return;
    const ids = [lastFocus.id];
    const [, kind, rest] = lastFocus.id.match(/^(install|cancel)-(.*)$/) || [];
    if (kind) ids.push(`${kind === "install" ? "cancel" : "install"}-${rest}`);
    if (lastFocus.row) ids.push(lastFocus.row);
    for (const id of ids) {
      const element = document.getElementById(id);
      if (element && !element.disabled) {
        restoring = true;
        element.focus();
        restoring = false;
        return;
      }
    }
  }

  document.body.addEventListener("htmx:afterSettle", () => {
    restoreFocus();
    paintAll();
  });

  // -- install progress ----------------------------------------------------------------------------

  const jobs = new Map(); // job id: the latest record from the event stream

  function bytes(n) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let size = n;
    let unit = 0;
    while (Math.abs(size) >= 1000 && unit < units.length - 1) {
      size /= 1000;
      unit += 1;
    }
    return unit === 0 ? `${size.toFixed(0)} B` : `${size.toFixed(1)} ${units[unit]}`;
  }

  function duration(seconds) {
    if (seconds < 60) return `${Math.ceil(seconds)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.ceil(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }

  const STATES = { queued: "Queued", retrying: "Retrying", done: "Installed", failed: "Failed", cancelled: "Cancelled" };
  const PHASES = { waiting: "Waiting", checking: "Checking", downloading: "Downloading", verifying: "Verifying", done: "Finishing" };

  function describe(job) {
    const parts = [STATES[job.state] || PHASES[job.phase] || "Starting"];
    if (job.total_bytes) {
      parts.push(`${Math.floor((100 * job.done_bytes) / job.total_bytes)}%`);
      parts.push(`${bytes(job.done_bytes)} of ${bytes(job.total_bytes)}`);
    }
    if (job.speed_bps) {
      parts.push(`${bytes(job.speed_bps)}/s`);
      if (job.total_bytes) parts.push(`${duration((job.total_bytes - job.done_bytes) / job.speed_bps)} left`);
    }
    if (job.message) parts.push(job.message);
    return parts.join(" · ");
  }

  function paint(job) {
    for (const panel of document.querySelectorAll(".job[data-job]")) {
      if (panel.dataset.job !== job.id) continue;
      const bar = panel.querySelector("progress");
      if (job.total_bytes) bar.value = Math.floor((100 * job.done_bytes) / job.total_bytes);
      else bar.removeAttribute("value"); // indeterminate until the size is known
      panel.querySelector(".job-text").textContent = describe(job);
    }
  }

  function paintAll() {
    for (const job of jobs.values()) paint(job);
  }

  let storeChanged = null;
  function refreshStore() {
    clearTimeout(storeChanged);
    storeChanged = setTimeout(() => htmx.trigger(document.body, "pendra:store"), 200);
  }

  const FINAL = ["done", "failed", "cancelled"];

  const startedHere = new Set(); // jobs this page's Install started
  const told = new Set(); // jobs whose end this page has said

  function ended(job, before) {
    // Said once, for a job this page saw running or started itself (the stream may repeat one
    // that just ended, and a job that fails at once can end before its POST has answered).
    const ran = (before && !FINAL.includes(before.state)) || startedHere.has(job.id);
    if (ran && !told.has(job.id)) {
      told.add(job.id);
      if (job.state === "done") toast(`${job.model} is installed.`);
      else if (job.state === "failed") toast(`Installing ${job.model} failed (${job.error_code || "install_failed"}).`);
      else toast(`The install of ${job.model} was cancelled.`);
    }
    refreshStore();
  }

  let following = false;
  let connections = 0;
  async function followJobs() {
    if (following) return;
    following = true;
    // Back after a dropped connection or a restart: a job may have ended meanwhile, unseen.
    if (connections++ > 0) refreshStore();
    try {
      for await (const { event, data } of events("/api/jobs/events")) {
        const job = JSON.parse(data);
        const before = jobs.get(job.id);
        jobs.set(job.id, job);
        paint(job);
        if (event !== "progress") ended(job, before);
      }
    } catch (error) {
      if (error.status === 401) return;
    } finally {
      following = false;
    }
    setTimeout(followJobs, 2000); // the server restarted or the connection dropped: follow again
  }

  document.body.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-install], button[data-cancel], button[data-uninstall]");
    if (!button) return;
    const [, kind, rest] = button.id.match(/^(install|cancel)-(.*)$/) || [];
    if (kind && document.activeElement === button) pendingFocus = `${kind === "install" ? "cancel" : "install"}-${rest}`;
    if (button.dataset.install) {
      button.disabled = true;
      button.textContent = "Starting…";
      try {
        const job = await (await postJSON("/api/models/install", { model: button.dataset.install })).json();
        startedHere.add(job.id);
        const seen = jobs.get(job.id); // the stream may already have told more than this answer
        if (!seen) jobs.set(job.id, job);
        else if (FINAL.includes(seen.state)) ended(seen, undefined);
      } catch (error) {
        toast(`Could not start the install: ${error.message}`);
      }
      refreshStore();
    } else if (button.dataset.cancel) {
      button.disabled = true;
      button.textContent = "Cancelling…";
      try {
        await api(`/api/jobs/${encodeURIComponent(button.dataset.cancel)}/cancel`, { method: "POST" });
      } catch (error) {
        toast(`Could not cancel: ${error.message}`);
        button.disabled = false;
        button.textContent = "Cancel";
      }
    } else {
      confirmUninstall(button);
    }
  });

  function confirmUninstall(button) {
    const dialog = $("confirm-uninstall");
    for (const slot of dialog.querySelectorAll("[data-fill]")) {
      slot.textContent = button.dataset[slot.dataset.fill] ?? button.dataset.uninstall;
    }
    dialog.returnValue = "";
    dialog.showModal();
    dialog.addEventListener(
      "close",
      async () => {
        // The list may have been re-rendered meanwhile: focus the button as it is now.
        if (dialog.returnValue !== "confirm") return document.getElementById(button.id)?.focus();
        const name = button.dataset.uninstall;
        try {
          await api(`/api/models/${encodeURIComponent(name)}`, { method: "DELETE" });
          toast(`${name} is uninstalled.`);
        } catch (error) {
          toast(`Could not uninstall ${name}: ${error.message}`);
        }
        refreshStore();
        $("installed-title").focus();
      },
      { once: true },
    );
  }

  // -- overview: tokens/s and requests/s --------------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const samples = [];

  function rates(field) {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const seconds = samples[i].time - samples[i - 1].time;
      const delta = samples[i][field] - samples[i - 1][field];
      out.push(seconds > 0 && delta > 0 ? delta / seconds : 0); // a restart resets the counters
    }
    return out;
  }

  function spark(svg, values) {
    svg.replaceChildren();
    if (!values.length) return;
    const top = Math.max(1, ...values);
    const step = 300 / Math.max(1, values.length - 1);
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(58 - (v / top) * 54).toFixed(1)}`);
    const area = document.createElementNS(SVG, "polygon");
    area.setAttribute("points", `0,60 ${points.join(" ")} ${((values.length - 1) * step).toFixed(1)},60`);
    area.setAttribute("class", "spark-area");
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", "spark-line");
    svg.append(area, line);
  }

  async function pollStats() {
    if (!document.hidden) {
      try {
        samples.push(await (await api("/api/console/stats")).json());
        if (samples.length > 61) samples.shift();
        const tokens = rates("generation_tokens");
        const requests = rates("requests");
        spark($("spark-tokens"), tokens);
        spark($("spark-requests"), requests);
        const last = samples[samples.length - 1];
        if (tokens.length) {
          $("live-tokens").textContent = tokens[tokens.length - 1].toFixed(1);
          $("live-requests").textContent = requests[requests.length - 1].toFixed(2);
        }
        $("live-now").textContent =
          `${last.running} running, ${last.waiting} waiting; ` +
          `${Math.round(last.generation_tokens)} tokens generated and ${Math.round(last.requests)} requests since the inference service started.`;
      } catch (error) {
        if (error.status === 401) return;
        $("live-now").textContent = `Live figures unavailable: ${error.message}`;
      }
    }
    setTimeout(pollStats, 2000);
  }

  // -- playground -------------------------------------------------------------------------------------

  function problem(message) {
    const paragraph = document.createElement("p");
    paragraph.className = "error";
    paragraph.setAttribute("role", "alert");
    paragraph.textContent = message;
    return paragraph;
  }

  async function loadModels() {
    let models = [];
    try {
      models = (await (await api("/v1/models")).json()).data;
    } catch (error) {
      if (error.status !== 401) toast(`Could not list the models: ${error.message}`);
      return;
    }
    for (const [purpose, select, none] of [
      ["chat", $("chat-model"), $("chat-none")],
      ["embedding", $("embed-model"), $("embed-none")],
    ]) {
      const fitting = models.filter((m) => m.purpose === purpose);
      for (const m of fitting) if (m.capabilities?.includes("vision")) seeing.add(m.id);
      select.replaceChildren(
        ...fitting.map((m) => {
          const option = document.createElement("option");
          option.value = m.id;
          option.textContent = m.loaded ? `${m.id} (loaded)` : m.id;
          return option;
        }),
      );
      none.hidden = fitting.length > 0;
      select.disabled = fitting.length === 0;
    }
    offerImages();
  }

  // -- playground: images, for a model that reads them ---------------------------------------------

  // The inference service's defaults (PENDRA_IMAGE_MAX_BYTES, PENDRA_MAX_IMAGES): checked here to
  // say so before sending; a server set tighter answers 400, shown like any other error.
  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];
  const IMAGE_MAX_BYTES = 5 * 1024 * 1024;
  const IMAGES_MAX = 8;
  const seeing = new Set(); // the chat models with a vision projector
  // The images for the next message: {name, url: a blob: URL for the thumbnail (the page's CSP
  // allows no data: images), data: the data: URL the request carries}.
  let attached = [];
  let shown = []; // the blob: URLs of the transcript's thumbnails, let go with the conversation

  function readsImages() {
    return seeing.has($("chat-model").value);
  }

  function offerImages() {
    const input = $("chat-image");
    const reads = readsImages();
    input.disabled = !reads;
    input.title = reads ? "" : "The selected model reads no images";
    $("chat-image-hint").textContent = reads
      ? "PNG, JPEG, WebP or GIF, up to 5 MiB each; you can also paste or drop one into the message."
      : "The selected model reads no images.";
    if (!reads && attached.length) {
      for (const image of attached) URL.revokeObjectURL(image.url);
      attached = [];
      showAttached();
    }
  }

  const dataURL = (file) =>
    new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });

  async function attach(files) {
    const error = $("chat-image-error");
    const problems = [];
    if (!readsImages()) problems.push(`${$("chat-model").value || "This model"} reads no images.`);
    else {
      for (const file of files) {
        if (!IMAGE_TYPES.includes(file.type)) problems.push(`${file.name} is not a PNG, JPEG, WebP or GIF image.`);
        else if (file.size > IMAGE_MAX_BYTES) problems.push(`${file.name} is ${bytes(file.size)}: an image may be at most 5 MiB.`);
        else if (attached.length >= IMAGES_MAX) problems.push(`At most ${IMAGES_MAX} images go with a message.`);
        else {
          try {
            attached.push({ name: file.name, url: URL.createObjectURL(file), data: await dataURL(file) });
          } catch {
            problems.push(`${file.name} could not be read.`);
          }
        }
      }
    }
    error.textContent = [...new Set(problems)].join(" ");
    showAttached();
  }

  function thumbnail(image) {
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.name;
    return img;
  }

  function showAttached() {
    const list = $("chat-images");
    list.hidden = attached.length === 0;
    list.replaceChildren(
      ...attached.map((image, index) => {
        const item = document.createElement("li");
        const remove = document.createElement("button");
        remove.type = "button";
        remove.className = "secondary";
        remove.textContent = "Remove";
        remove.setAttribute("aria-label", `Remove ${image.name}`);
        remove.addEventListener("click", () => {
          URL.revokeObjectURL(image.url);
          attached.splice(attached.indexOf(image), 1);
          showAttached();
          // The keyboard stays in the list: on the next image's Remove, or back on the picker.
          const buttons = list.querySelectorAll("button");
          (buttons[Math.min(index, buttons.length - 1)] || $("chat-image")).focus();
        });
        item.append(thumbnail(image), remove);
        return item;
      }),
    );
  }

  const imageFiles = (transfer) => [...(transfer?.files || [])].filter((file) => file.type.startsWith("image/"));

  let conversation = [];
  let generating = null;

  function addTurn(role, text, images = []) {
    const item = document.createElement("li");
    item.className = `turn ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : $("chat-model").value;
    item.append(who);
    if (images.length) {
      const pictures = document.createElement("div");
      pictures.className = "images";
      pictures.append(...images.map(thumbnail));
      item.append(pictures);
    }
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    item.append(body);
    $("transcript").append(item);
    return item;
  }

  // A thinking model's reasoning, folded above its answer (closed: the answer is what was asked
  // for); the returned element takes the text as it streams.
  function addThinking(turn) {
    const fold = document.createElement("details");
    fold.className = "thinking";
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const text = document.createElement("div");
    text.className = "reasoning";
    fold.append(summary, text);
    turn.querySelector(".text").before(fold);
    return text;
  }

  function setGenerating(controller) {
    generating = controller;
    $("chat-send").disabled = Boolean(controller);
    $("chat-stop").disabled = !controller;
    // Screen readers hear the finished answer, not every piece of it.
    $("transcript").setAttribute("aria-busy", String(Boolean(controller)));
  }

  async function sendChat(event) {
    event.preventDefault();
    if (generating) return;
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text) return;
    const model = $("chat-model").value;
    const convo = conversation; // "New conversation" during the answer starts another one
    const images = attached;
    // Images go first, as OpenAI's examples put them, and stay in the history: the next turn sends
    // them again (the server finds the prefix in its cache).
    const pictures = images.map((i) => ({ type: "image_url", image_url: { url: i.data } }));
    convo.push({ role: "user", content: pictures.length ? [...pictures, { type: "text", text }] : text });
    addTurn("user", text, images);
    shown.push(...images.map((i) => i.url));
    attached = [];
    showAttached();
    $("chat-image-error").textContent = "";
    input.value = "";
    const turn = addTurn("assistant", "");
    const body = turn.querySelector(".text");
    turn.classList.add("streaming");
    const controller = new AbortController();
    setGenerating(controller);
    const started = performance.now();
    let first = null;
    let content = "";
    let reasoning = "";
    let thought = null; // the folded reasoning, made at its first piece
    let usage = null;
    let finish = null;
    let pieces = 0;
    try {
      const request = {
        model,
        messages: convo,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("chat-temperature").value),
        max_tokens: Number($("chat-max-tokens").value),
      };
      for await (const { data } of events("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
        signal: controller.signal,
      })) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.code);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const thinking = choice.delta?.reasoning_content;
          if (thinking) {
            first ??= performance.now();
            reasoning += thinking;
            pieces += 1;
            thought ??= addThinking(turn);
            thought.textContent = reasoning;
          }
          const delta = choice.delta?.content;
          if (delta) {
            first ??= performance.now();
            content += delta;
            pieces += 1;
            body.textContent = content;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (error) {
      if (error.name === "AbortError") finish = "stopped";
      else turn.append(problem(error.message));
    } finally {
      setGenerating(null);
      turn.classList.remove("streaming");
    }
    if (content || reasoning) {
      // The reasoning goes back with the answer: a thinking model's template decides what to keep.
      const answer = { role: "assistant", content };
      if (reasoning) answer.reasoning_content = reasoning;
      convo.push(answer);
    } else convo.pop(); // no answer: the next message must not follow an unanswered one
    const end = performance.now();
    const tokens = usage?.completion_tokens ?? pieces;
    const stats = document.createElement("p");
    stats.className = "stats";
    const parts = [];
    if (first !== null) parts.push(`first token ${Math.round(first - started)} ms`);
    if (first !== null && tokens > 1 && end > first) parts.push(`${((tokens - 1) / ((end - first) / 1000)).toFixed(1)} tokens/s`);
    parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
    if (finish) parts.push(`finish: ${finish}`);
    stats.textContent = parts.join(" · ");
    turn.append(stats);
    input.focus();
  }

  function cosine(a, b) {
    let dot = 0;
    let na = 0;
    let nb = 0;
    for (let i = 0; i < a.length; i++) {
      dot += a[i] * b[i];
      na += a[i] * a[i];
      nb += b[i] * b[i];
    }
    return na && nb ? dot / Math.sqrt(na * nb) : 0;
  }

  async function sendEmbed(event) {
    event.preventDefault();
    const result = $("embed-result");
    const lines = $("embed-input").value.split("\n").map((l) => l.trim()).filter(Boolean).slice(0, 12);
    if (lines.length < 2) {
      result.textContent = "Write at least two lines to compare.";
      return;
    }
    $("embed-send").disabled = true;
    result.textContent = "Embedding…";
    try {
      const body = await (await postJSON("/v1/embeddings", { model: $("embed-model").value, input: lines })).json();
      const vectors = body.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
      result.replaceChildren(similarityTable(lines, vectors));
    } catch (error) {
      result.replaceChildren(problem(error.message));
    } finally {
      $("embed-send").disabled = false;
    }
  }

  function similarityTable(lines, vectors) {
    const wrap = document.createElement("div");
    const table = document.createElement("table");
    table.className = "similarity";
    const caption = document.createElement("caption");
    caption.textContent = `Cosine similarity of ${lines.length} lines (${vectors[0].length} dimensions)`;
    const head = document.createElement("tr");
    head.append(document.createElement("td"));
    lines.forEach((_, j) => {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = String(j + 1);
      head.append(th);
    });
    const thead = document.createElement("thead");
    thead.append(head);
    const tbody = document.createElement("tbody");
    let best = null;
    lines.forEach((line, i) => {
      const row = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = `${i + 1}. ${line}`;
      row.append(th);
      vectors.forEach((other, j) => {
        const value = cosine(vectors[i], other);
        const td = document.createElement("td");
        td.textContent = value.toFixed(3);
        td.dataset.value = value.toFixed(6);
        td.className = i === j ? "self" : value >= 0.75 ? "high" : value >= 0.5 ? "mid" : "low";
        row.append(td);
        if (i < j && (!best || value > best.value)) best = { i, j, value };
      });
      tbody.append(row);
    });
    table.append(caption, thead, tbody);
    const summary = document.createElement("p");
    summary.className = "summary";
    summary.textContent = `Most alike: lines ${best.i + 1} and ${best.j + 1} (${best.value.toFixed(3)}).`;
    wrap.append(table, summary);
    return wrap;
  }

  // -- start ----------------------------------------------------------------------------------------

  if (page === "models") followJobs();
  if (page === "overview") pollStats();
  if (page === "playground") {
    loadModels();
    $("chat-form").addEventListener("submit", sendChat);
    $("chat-stop").addEventListener("click", () => generating?.abort());
    $("chat-clear").addEventListener("click", () => {
      generating?.abort();
      conversation = [];
      $("transcript").replaceChildren();
      for (const url of shown) URL.revokeObjectURL(url);
      shown = [];
      $("chat-input").focus();
    });
    $("chat-model").addEventListener("change", offerImages);
    $("chat-image").addEventListener("change", async (event) => {
      const picker = event.target;
      await attach([...picker.files]);
      picker.value = ""; // the same file may be picked again after its removal
    });
    $("chat-input").addEventListener("paste", (event) => {
      const files = imageFiles(event.clipboardData);
      if (!files.length) return;
      event.preventDefault();
      attach(files);
    });
    $("chat-form").addEventListener("dragover", (event) => {
      if (event.dataTransfer?.types.includes("Files")) event.preventDefault();
    });
    $("chat-form").addEventListener("drop", (event) => {
      if (!event.dataTransfer?.types.includes("Files")) return; // dropped text goes in the message
      event.preventDefault(); // a file the browser would otherwise open in place of the page
      attach([...event.dataTransfer.files]);
    });
    $("chat-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("chat-form").requestSubmit();
      }
    });
    $("embed-form").addEventListener("submit", sendEmbed);
  }
})();
