/* rillet chat page: streams /v1/chat/completions (OpenAI SSE) into the page.
 *
 * No framework, no build step, nothing fetched from elsewhere. Untrusted text
 * (the user's and the model's) reaches the DOM only as text nodes: user
 * messages through textContent, model output through RilletMarkdown.render,
 * which builds nodes itself and never parses HTML.
 */
(function () {
  "use strict";

  var STORE = {
    apiKey: "rillet.apiKey",
    system: "rillet.systemPrompt",
    temperature: "rillet.temperature",
    maxTokens: "rillet.maxTokens",
    tools: "rillet.tools",
    jsonSchema: "rillet.jsonSchema",
    model: "rillet.model",
  };

  var $ = function (id) { return document.getElementById(id); };
  var ui = {
    messages: $("messages"),
    emptyHint: $("empty-hint"),
    status: $("status"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
    settings: $("settings"),
    system: $("system-prompt"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
    tools: $("tools"),
    jsonSchema: $("json-schema"),
    model: $("model"),
    keyRow: $("api-key-row"),
    apiKey: $("api-key"),
    forgetKey: $("forget-key"),
  };

  /* The conversation sent to the server (system prompt excluded: it is read
   * from the settings at each request). */
  var history = [];
  /* The turn being streamed: {controller, ...} or null. */
  var active = null;
  /* Bumped by New chat so a late-finishing stream cannot touch the new one. */
  var generation = 0;

  /* ------------------------------------------------------------ storage */

  function load(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return null; }
  }

  function save(key, value) {
    try {
      if (value === null || value === "") window.localStorage.removeItem(key);
      else window.localStorage.setItem(key, value);
    } catch (e) { /* storage disabled: settings last for this page only */ }
  }

  function apiKey() {
    return ui.apiKey.value.trim();
  }

  function authHeaders(extra) {
    var headers = extra || {};
    var key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  function showKeyField(focus) {
    ui.keyRow.hidden = false;
    ui.settings.open = true;
    if (focus) ui.apiKey.focus();
  }

  function setStatus(message, kind) {
    ui.status.textContent = message || "";
    ui.status.hidden = !message;
    ui.status.dataset.kind = kind || "info";
  }

  /* ------------------------------------------------------------- models */

  var modelRetry = 0;

  function loadModels() {
    window.clearTimeout(modelRetry);
    return fetch("/v1/models", { headers: authHeaders({ Accept: "application/json" }) })
      .then(function (res) {
        if (res.status === 503) {
          // Still loading the model (or draining): say so and ask again shortly.
          setStatus("The server is not ready yet (503); retrying…", "info");
          modelRetry = window.setTimeout(loadModels, 2000);
          return undefined;
        }
        if (res.status === 401) {
          showKeyField(false);
          return readError(res).then(function (msg) {
            setStatus("This server needs an API key (401: " + msg + "). Enter it in Settings.", "error");
          });
        }
        if (!res.ok) {
          return readError(res).then(function (msg) {
            setStatus("Could not list models (" + res.status + ": " + msg + ").", "error");
          });
        }
        return res.json().then(function (body) {
          var ids = ((body && body.data) || [])
            .map(function (m) { return m && typeof m.id === "string" ? m.id : null; })
            .filter(Boolean);
          fillModels(ids);
          setStatus("");
        });
      })
      .catch(function (err) {
        setStatus("Could not reach the server: " + describe(err), "error");
      });
  }

  function fillModels(ids) {
    var wanted = ui.model.value || load(STORE.model);
    ui.model.replaceChildren();
    ids.forEach(function (id) {
      var option = document.createElement("option");
      option.value = id;
      option.textContent = id;
      ui.model.appendChild(option);
    });
    if (wanted && ids.indexOf(wanted) >= 0) ui.model.value = wanted;
    ui.model.disabled = ids.length === 0;
  }

  /* ------------------------------------------------------------- errors */

  function describe(err) {
    if (!err) return "unknown error";
    return err.message || String(err);
  }

  /* The message of an error response: OpenAI {error: {message}}, FastAPI
   * {detail}, or the start of the body as text. */
  function readError(res) {
    return res.text().then(function (body) {
      var msg = "";
      try {
        var parsed = JSON.parse(body);
        if (parsed && parsed.error) {
          msg = typeof parsed.error === "string" ? parsed.error : parsed.error.message;
        } else if (parsed && parsed.detail) {
          msg = typeof parsed.detail === "string" ? parsed.detail : JSON.stringify(parsed.detail);
        }
      } catch (e) { /* not JSON */ }
      msg = msg || body.trim().slice(0, 500) || res.statusText || "no details";
      return msg;
    }, function () {
      return res.statusText || "no details";
    });
  }

  /* ------------------------------------------------------------ display */

  function hideEmptyHint() {
    if (ui.emptyHint && ui.emptyHint.parentNode) ui.emptyHint.remove();
  }

  function nearBottom() {
    var el = ui.messages;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
  }

  function scrollToEnd(force) {
    if (force || nearBottom()) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function addUserMessage(textValue) {
    hideEmptyHint();
    var box = document.createElement("article");
    box.className = "msg user";
    var label = document.createElement("h2");
    label.className = "visually-hidden";
    label.textContent = "You";
    var body = document.createElement("div");
    body.className = "content";
    body.textContent = textValue; // shown as typed, never parsed as HTML
    box.append(label, body);
    ui.messages.appendChild(box);
    scrollToEnd(true);
    return box;
  }

  function addAssistantMessage() {
    var box = document.createElement("article");
    box.className = "msg assistant";
    box.dataset.state = "waiting";
    box.setAttribute("aria-busy", "true");
    var label = document.createElement("h2");
    label.className = "visually-hidden";
    label.textContent = "Assistant";
    var body = document.createElement("div");
    body.className = "content markdown";
    var meta = document.createElement("p");
    meta.className = "meta";
    meta.textContent = "waiting for the first token…";
    box.append(label, body, meta);
    ui.messages.appendChild(box);
    scrollToEnd(true);
    return { box: box, body: body, meta: meta };
  }

  function addError(message, anchor) {
    hideEmptyHint();
    var box = document.createElement("div");
    box.className = "msg error";
    box.setAttribute("role", "alert");
    box.textContent = message;
    if (anchor && anchor.parentNode === ui.messages) anchor.after(box);
    else ui.messages.appendChild(box);
    scrollToEnd(true);
    return box;
  }

  function formatMeta(turn) {
    var parts = [];
    var span = function (cls, textValue) {
      var s = document.createElement("span");
      s.className = cls;
      s.textContent = textValue;
      parts.push(s);
    };
    if (turn.firstTokenAt !== null) {
      span("ttft", "first token " + formatSeconds(turn.firstTokenAt - turn.startedAt));
    } else {
      span("ttft", "no tokens");
    }
    var tokens = turn.usageTokens !== null ? turn.usageTokens : turn.chunks;
    var approx = turn.usageTokens === null ? "~" : "";
    var decodeSeconds = turn.firstTokenAt !== null ? (turn.endedAt - turn.firstTokenAt) / 1000 : 0;
    if (tokens > 1 && decodeSeconds > 0) {
      span("tps", approx + ((tokens - 1) / decodeSeconds).toFixed(1) + " tok/s");
    }
    span("tokens", approx + tokens + (tokens === 1 ? " token" : " tokens"));
    span("finish", "finish: " + turn.finish);
    turn.ui.meta.replaceChildren();
    parts.forEach(function (p, i) {
      if (i) turn.ui.meta.appendChild(document.createTextNode(" · "));
      turn.ui.meta.appendChild(p);
    });
  }

  function formatSeconds(ms) {
    return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(2) + " s";
  }

  /* Re-render the answer at most once per animation frame. */
  function scheduleRender(turn) {
    if (turn.frame) return;
    turn.frame = window.requestAnimationFrame(function () {
      turn.frame = 0;
      renderNow(turn);
    });
  }

  function renderNow(turn) {
    if (turn.frame) {
      window.cancelAnimationFrame(turn.frame);
      turn.frame = 0;
    }
    var stick = nearBottom();
    turn.ui.body.replaceChildren(window.RilletMarkdown.render(turn.text));
    turn.toolCalls.forEach(function (call) { turn.ui.body.appendChild(toolCallNode(call)); });
    if (stick) scrollToEnd(true);
  }

  /* A tool call as a block of its own: the function's name, then its arguments (text only). */
  function toolCallNode(call) {
    var box = document.createElement("div");
    box.className = "tool-call";
    var title = document.createElement("p");
    title.className = "tool-name";
    title.textContent = "Tool call: " + (call.name || "…");
    var args = document.createElement("pre");
    var code = document.createElement("code");
    code.textContent = prettyJSON(call.arguments);
    args.appendChild(code);
    box.append(title, args);
    return box;
  }

  function prettyJSON(textValue) {
    try { return JSON.stringify(JSON.parse(textValue), null, 2); } catch (e) { return textValue; }
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  /* ------------------------------------------------------------ request */

  function requestBody() {
    var messages = [];
    var system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    history.forEach(function (m) {
      var entry = { role: m.role, content: m.content };
      if (m.tool_calls) entry.tool_calls = m.tool_calls;
      messages.push(entry);
    });
    var body = {
      messages: messages,
      stream: true,
      stream_options: { include_usage: true },
    };
    var tools = parseSetting(ui.tools, "Tools");
    if (tools) body.tools = Array.isArray(tools) ? tools : [tools];
    var schema = parseSetting(ui.jsonSchema, "Answer format");
    if (schema) body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: schema } };
    if (ui.model.value) body.model = ui.model.value;
    var temperature = parseFloat(ui.temperature.value);
    if (isFinite(temperature)) body.temperature = temperature;
    var maxTokens = parseInt(ui.maxTokens.value, 10);
    if (isFinite(maxTokens)) body.max_tokens = maxTokens;
    return body;
  }

  /* The JSON in a settings box, or null when it is empty; throws a message naming the box when
   * it is not JSON. */
  function parseSetting(box, label) {
    var textValue = box.value.trim();
    if (!textValue) return null;
    try {
      return JSON.parse(textValue);
    } catch (e) {
      throw new Error(label + " is not valid JSON: " + e.message);
    }
  }

  function send() {
    var content = ui.prompt.value;
    if (!content.trim() || active) return;
    try {
      requestBody();
    } catch (e) { // a settings box holds broken JSON: say so, send nothing
      ui.settings.open = true;
      setStatus(e.message, "settings");
      return;
    }
    if (ui.status.dataset.kind === "settings") setStatus("");
    ui.prompt.value = "";
    var userBox = addUserMessage(content);
    var userEntry = { role: "user", content: content };
    history.push(userEntry);

    var turn = {
      generation: generation,
      controller: new AbortController(),
      ui: addAssistantMessage(),
      userBox: userBox,
      userEntry: userEntry,
      prompt: content,
      text: "",
      toolCalls: [],
      chunks: 0,
      usageTokens: null,
      finish: null,
      startedAt: performance.now(),
      firstTokenAt: null,
      endedAt: null,
      frame: 0,
      gotResponse: false,
      sawDone: false,
    };
    active = turn;
    setBusy(true);

    stream(turn).then(function (outcome) {
      finish(turn, outcome);
    }, function (err) {
      if (turn.controller.signal.aborted) finish(turn, { state: "stopped" });
      else finish(turn, { state: "error", message: "Network error: " + describe(err) });
    });
  }

  function stream(turn) {
    return fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(requestBody()),
      signal: turn.controller.signal,
      cache: "no-store",
    }).then(function (res) {
      turn.gotResponse = true;
      if (!res.ok) {
        return readError(res).then(function (msg) {
          var outcome = { state: "error", status: res.status, message: "Error " + res.status + ": " + msg };
          if (res.status === 401) {
            outcome.message += " — check the API key in Settings.";
            outcome.needsKey = true;
          } else if (res.status === 429) {
            var retry = res.headers.get("Retry-After");
            outcome.message += retry ? " (retry after " + retry + " s)" : " (the server is busy; try again shortly)";
          }
          return outcome;
        });
      }
      if (!res.body) return { state: "error", message: "The browser gave no response stream." };
      return readStream(turn, res.body.getReader());
    });
  }

  /* Read an SSE body: events are separated by a blank line; each `data:` line
   * adds to the event's data; `:` lines are comments (keep-alives). */
  function readStream(turn, reader) {
    var decoder = new TextDecoder();
    var pending = "";
    var dataLines = [];
    var outcome = null;

    function dispatch() {
      if (!dataLines.length) return;
      var data = dataLines.join("\n");
      dataLines = [];
      if (data === "[DONE]") {
        turn.sawDone = true;
        return;
      }
      var event;
      try {
        event = JSON.parse(data);
      } catch (e) {
        outcome = { state: "error", message: "The server sent a malformed event: " + data.slice(0, 200) };
        return;
      }
      handleEvent(turn, event, function (o) { outcome = o; });
    }

    function feed(textChunk, final) {
      pending += textChunk;
      var lines = pending.split(/\r\n|\r|\n/);
      pending = final ? "" : lines.pop();
      for (var i = 0; i < lines.length && !outcome; i++) {
        var line = lines[i];
        if (line === "") dispatch();
        else if (line.charAt(0) === ":") continue;
        else if (line.slice(0, 5) === "data:") dataLines.push(line.charAt(5) === " " ? line.slice(6) : line.slice(5));
      }
      if (final && !outcome) dispatch();
    }

    function pump() {
      return reader.read().then(function (step) {
        if (step.done) {
          feed(decoder.decode(), true);
          return outcome || endOfStream(turn);
        }
        feed(decoder.decode(step.value, { stream: true }), false);
        if (outcome) {
          // The server ends the stream after an error event; don't wait for it.
          reader.cancel().catch(function () {});
          return outcome;
        }
        return pump();
      });
    }
    return pump();
  }

  function handleEvent(turn, event, setOutcome) {
    if (event && event.error) {
      var err = event.error;
      var msg = typeof err === "string" ? err : (err.message || JSON.stringify(err));
      setOutcome({ state: "error", message: "The server reported an error mid-stream: " + msg });
      return;
    }
    if (event && event.usage && typeof event.usage.completion_tokens === "number") {
      turn.usageTokens = event.usage.completion_tokens;
    }
    var choice = event && Array.isArray(event.choices) ? event.choices[0] : null;
    if (!choice) return;
    var delta = choice.delta || {};
    var calls = Array.isArray(delta.tool_calls) ? delta.tool_calls : [];
    if ((typeof delta.content === "string" && delta.content) || calls.length) {
      if (turn.firstTokenAt === null) {
        turn.firstTokenAt = performance.now();
        turn.ui.box.dataset.state = "streaming";
        turn.ui.meta.textContent = "streaming…";
      }
      if (typeof delta.content === "string") turn.text += delta.content;
      calls.forEach(function (piece) { addToolCallPiece(turn, piece); });
      turn.chunks += 1;
      scheduleRender(turn);
    }
    if (choice.finish_reason) turn.finish = choice.finish_reason;
  }

  /* OpenAI streams a call's id and name first, then its arguments in pieces, by index. */
  function addToolCallPiece(turn, piece) {
    var index = typeof piece.index === "number" ? piece.index : turn.toolCalls.length;
    var call = turn.toolCalls[index];
    if (!call) call = turn.toolCalls[index] = { id: null, name: "", arguments: "" };
    var fn = piece.function || {};
    if (piece.id) call.id = piece.id;
    if (typeof fn.name === "string") call.name += fn.name;
    if (typeof fn.arguments === "string") call.arguments += fn.arguments;
  }

  function endOfStream(turn) {
    if (turn.finish || turn.sawDone) return { state: "done" };
    return { state: "error", message: "The connection closed before the answer finished." };
  }

  function finish(turn, outcome) {
    turn.endedAt = performance.now();
    if (turn.generation !== generation) return; // New chat was pressed meanwhile
    renderNow(turn);
    var box = turn.ui.box;
    box.removeAttribute("aria-busy");
    box.dataset.state = outcome.state;
    if (outcome.state === "stopped") turn.finish = "stopped";
    else if (outcome.state === "error") turn.finish = turn.finish || "error";
    else turn.finish = turn.finish || "stop";

    var hasText = turn.text.length > 0 || turn.toolCalls.length > 0;
    if (hasText) {
      var entry = { role: "assistant", content: turn.text };
      if (turn.toolCalls.length) {
        entry.tool_calls = turn.toolCalls.map(function (c, i) {
          return { id: c.id || "call_" + i, type: "function", function: { name: c.name, arguments: c.arguments } };
        });
      }
      history.push(entry);
      formatMeta(turn);
    } else if (outcome.state === "error") {
      box.remove();
    } else {
      if (outcome.state === "done") {
        var empty = document.createElement("p");
        empty.className = "empty-answer";
        empty.textContent = "(the model returned no text)";
        turn.ui.body.replaceChildren(empty);
      }
      formatMeta(turn);
    }

    if (outcome.state === "error") {
      addError(outcome.message, hasText ? box : turn.userBox);
      if (!hasText) {
        // Nothing came back: take the question out of the context and give it
        // back to the composer so Enter retries it.
        var idx = history.indexOf(turn.userEntry);
        if (idx >= 0) history.splice(idx, 1);
        turn.userBox.classList.add("unsent");
        if (!ui.prompt.value) ui.prompt.value = turn.prompt;
      }
      if (outcome.needsKey) showKeyField(true);
    }

    active = null;
    setBusy(false);
    if (!outcome.needsKey) ui.prompt.focus();
    scrollToEnd(false);
  }

  function stop() {
    if (active) active.controller.abort();
  }

  function newChat() {
    if (active) {
      active.controller.abort();
      active = null;
    }
    generation += 1;
    history = [];
    ui.messages.replaceChildren();
    setBusy(false);
    ui.prompt.value = "";
    ui.prompt.focus();
  }

  /* ------------------------------------------------------------- wiring */

  function restoreSettings() {
    ui.system.value = load(STORE.system) || "";
    ui.temperature.value = load(STORE.temperature) || "";
    ui.maxTokens.value = load(STORE.maxTokens) || "";
    ui.tools.value = load(STORE.tools) || "";
    ui.jsonSchema.value = load(STORE.jsonSchema) || "";
    var key = load(STORE.apiKey);
    if (key) {
      ui.apiKey.value = key;
      ui.keyRow.hidden = false;
    }
  }

  ui.composer.addEventListener("submit", function (e) {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && active) {
      e.preventDefault();
      stop();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);

  ui.system.addEventListener("input", function () { save(STORE.system, ui.system.value); });
  ui.temperature.addEventListener("input", function () { save(STORE.temperature, ui.temperature.value); });
  ui.maxTokens.addEventListener("input", function () { save(STORE.maxTokens, ui.maxTokens.value); });
  ui.tools.addEventListener("input", function () { save(STORE.tools, ui.tools.value); });
  ui.jsonSchema.addEventListener("input", function () { save(STORE.jsonSchema, ui.jsonSchema.value); });
  ui.model.addEventListener("change", function () { save(STORE.model, ui.model.value); });
  ui.apiKey.addEventListener("input", function () { save(STORE.apiKey, apiKey()); });
  ui.apiKey.addEventListener("change", function () { loadModels(); });
  ui.apiKey.addEventListener("keydown", function (e) {
    if (e.key === "Enter") {
      e.preventDefault();
      loadModels();
      ui.prompt.focus();
    }
  });
  ui.forgetKey.addEventListener("click", function () {
    ui.apiKey.value = "";
    save(STORE.apiKey, null);
    ui.apiKey.focus();
  });

  restoreSettings();
  setBusy(false);
  loadModels();
  ui.prompt.focus();
})();
