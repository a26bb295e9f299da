// oogiri upload page. Served as a file so that the CSP can forbid inline script.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const i18n = JSON.parse($("oogiri-i18n").textContent);
  const maxBytes = Number(document.body.dataset.maxBytes) || Infinity;
  let csrf = document.querySelector('meta[name="csrf-token"]').content;
  // The page's language (it may come from ?lang=) is the language of its answers and jokes too.
  const lang = document.documentElement.lang;
  const api = (path) => path + "?lang=" + encodeURIComponent(lang);

  const form = $("upload");
  const input = $("file");
  const drop = $("drop");
  const preview = $("preview");
  const fileName = $("file-name");
  const hint = $("hint");
  const submit = $("submit");
  const statusLine = $("status");
  const errorBox = $("error");
  const result = $("result");
  const jokeText = $("joke-text");
  const modelVersion = $("model-version");
  const demoMark = $("demo-mark");
  const upButton = $("vote-up");
  const downButton = $("vote-down");
  const upCount = $("count-up");
  const downCount = $("count-down");
  const voteStatus = $("vote-status");

  let file = null;
  let previewUrl = null;
  let jokeId = null;
  let myVote = 0;
  let busy = false;
  let voting = false;
  const REFRESH_MS = 15000;

  function takeToken(response) {
    const token = response.headers.get("X-CSRF-Token");
    if (token) csrf = token;
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (_) {
      return {};
    }
  }

  // What to say for an error answer: ours carry a message; one without (a proxy's HTML page,
  // uvicorn's plain-text 503) still came from a server, so it is no connection problem.
  function failure(response, data) {
    if (data.message) return data.message;
    return response.status === 413 ? i18n.too_large : i18n.internal;
  }

  // Busy buttons stay focusable (aria-disabled, not disabled): disabling the focused button
  // would throw a keyboard user's focus back to the top of the page.
  function hold(button, value) {
    button.setAttribute("aria-disabled", value ? "true" : "false");
  }

  function setFile(candidate) {
    if (!candidate) return;
    showError("");
    if (candidate.size > maxBytes) {
      showError(i18n.too_large);
      return;
    }
    file = candidate;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(candidate);
    preview.src = previewUrl;
    preview.hidden = false;
    drop.classList.add("has-image");
    fileName.textContent = candidate.name || "";
    fileName.hidden = !candidate.name;
    submit.disabled = busy;
  }

  // A format the browser cannot show (e.g. TIFF) is still worth sending: the server decides.
  preview.addEventListener("error", () => {
    preview.hidden = true;
  });

  input.addEventListener("change", () => setFile(input.files && input.files[0]));

  ["dragenter", "dragover"].forEach((type) =>
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    })
  );
  ["dragleave", "dragend"].forEach((type) =>
    drop.addEventListener(type, () => drop.classList.remove("dragging"))
  );
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) setFile(files[0]);
  });
  // Dropping next to the zone must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  document.addEventListener("paste", (event) => {
    const items = (event.clipboardData && event.clipboardData.items) || [];
    for (const item of items) {
      if (item.kind === "file" && item.type.startsWith("image/")) {
        const pasted = item.getAsFile();
        if (pasted) {
          event.preventDefault();
          setFile(pasted);
          return;
        }
      }
    }
  });

  function setBusy(value) {
    busy = value;
    submit.disabled = !file;
    hold(submit, value);
    form.setAttribute("aria-busy", value ? "true" : "false");
  }

  function showCounts(data) {
    upCount.textContent = String(data.up);
    downCount.textContent = String(data.down);
    if (data.vote === 1 || data.vote === -1) myVote = data.vote;
    upButton.setAttribute("aria-pressed", myVote === 1 ? "true" : "false");
    downButton.setAttribute("aria-pressed", myVote === -1 ? "true" : "false");
  }

  // Keep the counts live while the joke is on screen (other people vote too).
  window.setInterval(async () => {
    if (jokeId === null || document.visibilityState !== "visible") return;
    try {
      const response = await fetch(api("/api/jokes/" + encodeURIComponent(jokeId)), {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (response.ok) {
        const data = await readJson(response);
        if (data.id === jokeId) showCounts(data);
      }
    } catch (_) {
      // offline for a moment: the next tick tries again
    }
  }, REFRESH_MS);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (busy) return;
    if (!file) {
      showError(i18n.no_image);
      return;
    }
    showError("");
    setBusy(true);
    statusLine.textContent = i18n.thinking;
    let spoken = "";
    const sent = file;
    const body = new FormData();
    body.append("image", file, file.name || "image");
    if (hint.value.trim()) body.append("hint", hint.value.trim());
    try {
      const response = await fetch(api("/api/jokes"), {
        method: "POST",
        body,
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      takeToken(response);
      const data = await readJson(response);
      // Another picture was picked meanwhile: this answer is not about the one on screen.
      if (file !== sent) return;
      if (!response.ok) {
        showError(failure(response, data));
        return;
      }
      jokeId = data.id;
      myVote = 0;
      jokeText.textContent = data.text;
      modelVersion.textContent = data.model_version;
      // The engine declared itself a demo: say so on the card itself, not only in the banner.
      demoMark.hidden = !data.demo;
      result.classList.toggle("is-demo", Boolean(data.demo));
      voteStatus.textContent = "";
      showCounts(data);
      result.hidden = false;
      result.dataset.jokeId = String(data.id);
      result.scrollIntoView({ behavior: "smooth", block: "nearest" });
      spoken = data.text;
    } catch (_) {
      if (file === sent) showError(i18n.network);
    } finally {
      // The status line is a live region from the start (the result card appears with its
      // content, which screen readers do not reliably read out): it reads the joke out.
      statusLine.textContent = "";
      if (spoken) {
        const line = document.createElement("span");
        line.className = "visually-hidden";
        line.textContent = spoken;
        statusLine.append(line);
      }
      setBusy(false);
    }
  });

  // ``id``: the joke voted on, fixed when the vote is clicked (the retry too goes to it, even
  // if another joke is on screen by then).
  async function sendVote(id, value, retried) {
    const response = await fetch(api("/api/jokes/" + encodeURIComponent(id) + "/rating"), {
      method: "POST",
      credentials: "same-origin",
      headers: {
        "Content-Type": "application/json",
        Accept: "application/json",
        "X-CSRF-Token": csrf,
      },
      body: JSON.stringify({ value }),
    });
    takeToken(response);
    const data = await readJson(response);
    // A stale token (cookie replaced meanwhile) is refreshed by the answer: try once more.
    if (response.status === 403 && data.error === "csrf" && !retried) {
      return sendVote(id, value, true);
    }
    return { response, data };
  }

  async function vote(value) {
    if (jokeId === null || voting) return;
    const voted = jokeId;
    voting = true;
    hold(upButton, true);
    hold(downButton, true);
    try {
      const { response, data } = await sendVote(voted, value, false);
      // Another joke was shown meanwhile: this answer (counts, "saved", an error) is not
      // about the one on screen.
      if (jokeId !== voted) return;
      if (!response.ok) {
        showError(failure(response, data));
        return;
      }
      showError("");
      showCounts(data);
      voteStatus.textContent = i18n.vote_saved;
    } catch (_) {
      if (jokeId === voted) showError(i18n.network);
    } finally {
      voting = false;
      hold(upButton, false);
      hold(downButton, false);
    }
  }

  upButton.addEventListener("click", () => vote(1));
  downButton.addEventListener("click", () => vote(-1));
})();
