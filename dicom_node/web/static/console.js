// The only script of the console. Every page works without it; it explains missing images and runs
// the automatic reloads, which therefore never come without the switch that stops them.
document.addEventListener("DOMContentLoaded", () => {
  // Say why an image is missing instead of showing a broken icon. An <img> is not told the answer's
  // status, so the image is asked for once more: a console busy with other images (503) or a session
  // that ended (sent to the login page) was said to be a file missing or not displayable.
  const IMAGE_BUSY = "The console is busy with other images: reload the page in a moment to see this one.";
  const IMAGE_SESSION_ENDED = "Your session has ended. Reload the page to log in again.";
  const IMAGE_NO_ANSWER = "The node did not answer: reload the page in a moment to see this image.";
  for (const img of document.querySelectorAll("img[data-fallback]")) {
    const say = (text) => {
      const note = document.createElement("div");
      note.className = "placeholder";
      note.textContent = text;
      img.replaceWith(note);
    };
    const explain = async () => {
      if (img.src.startsWith("blob:")) return say(img.dataset.fallback);  // answered, and not an image
      let response;
      try {
        response = await fetch(img.src, { credentials: "same-origin", redirect: "manual", cache: "no-store" });
      } catch (error) {
        return say(IMAGE_NO_ANSWER);
      }
      if (response.type === "opaqueredirect" || response.status === 401) return say(IMAGE_SESSION_ENDED);
      if (response.status === 503) return say(IMAGE_BUSY);
      if (!response.ok) return say(img.dataset.fallback);
      img.addEventListener("error", explain, { once: true });
      img.src = URL.createObjectURL(await response.blob());  // its turn came this time: shown after all
    };
    if (img.complete && img.naturalWidth === 0) explain();
    else img.addEventListener("error", explain, { once: true });
  }

  // A refused form: its message takes the focus, so that it is read out and Tab goes on from it.
  document.getElementById("form-error")?.focus();

  // A table wider than its card (a narrow window, 200 % zoom) scrolls inside it; keyboard users can
  // scroll it only if it takes the focus, which it does only while it is too wide (WCAG 2.1.1, 1.4.10).
  const scrollable = () => {
    for (const wrap of document.querySelectorAll(".table-wrap")) {
      if (wrap.scrollWidth > wrap.clientWidth) wrap.tabIndex = 0;
      else wrap.removeAttribute("tabindex");
    }
  };
  scrollable();
  window.addEventListener("resize", scrollable);

  // Pages that update themselves (the dashboard, a study being analysed). A <meta http-equiv=refresh>
  // did it before and could not be stopped: each reload threw keyboard and screen-reader users back to
  // the top of the page (WCAG 2.2.1, 2.2.2). The switch beside it turns the reloads off for this tab,
  // and a reload waits while the keyboard focus is on something in the page.
  const reload = document.querySelector("input[data-reload-url]");
  if (reload) {
    const remembered = "cxr-reload:" + location.pathname;
    reload.closest("[hidden]")?.removeAttribute("hidden");
    if (sessionStorage.getItem(remembered) === "off") reload.checked = false;
    let timer = 0;
    const keyboardBusy = () => {
      const focused = document.activeElement;
      return focused !== null && focused !== document.body && focused.id !== "main"
        && focused.matches(":focus-visible");
    };
    const due = () => {
      if (keyboardBusy()) timer = setTimeout(due, 5000);
      else location.replace(reload.dataset.reloadUrl);
    };
    const arm = () => {
      clearTimeout(timer);
      if (reload.checked) timer = setTimeout(due, 1000 * Number(reload.dataset.reloadSeconds));
    };
    reload.addEventListener("change", () => {
      sessionStorage.setItem(remembered, reload.checked ? "on" : "off");
      arm();
    });
    arm();
  }

  // Two minutes before the session ends, say so, and offer to go on where only idleness ends it. The
  // page's clock is the server's (the page's render time, then each answer's Date header). Another tab
  // may have used the session meanwhile: its times are asked first, with ?auto=1, which does not use it.
  const warning = document.getElementById("session-warning");
  if (warning) {
    const WARN_MS = 120000;
    const text = warning.querySelector("p");
    const extend = warning.querySelector("[data-session-extend]");
    let skew = Date.parse(warning.dataset.serverNow) - Date.now();
    let expires = Date.parse(warning.dataset.expiresAt);
    let ends = Date.parse(warning.dataset.endsAt);
    let timer = 0;
    const serverNow = () => Date.now() + skew;
    // at most an hour ahead: a longer timer fires at once past 2^31 ms, and a sleeping computer delays it
    const schedule = (ms) => {
      clearTimeout(timer);
      timer = setTimeout(check, Math.min(Math.max(0, ms), 3600000));
    };
    const ended = () => {
      text.textContent = "Your session has ended. Reload the page to log in again.";
      extend.hidden = true;
      warning.hidden = false;
    };
    const session = async (url) => {
      const response = await fetch(url, {
        credentials: "same-origin", headers: { Accept: "application/json" },
      });
      if (!response.ok) return false;
      const info = await response.json();
      const date = Date.parse(response.headers.get("Date") || "");
      if (!Number.isNaN(date)) skew = date - Date.now();
      expires = Date.parse(info.expires_at);
      ends = Date.parse(info.ends_at);
      return true;
    };
    async function check() {
      try {
        if (!(await session("/api/session?auto=1"))) return ended();
      } catch (error) {
        return schedule(30000);  // the node did not answer: ask again
      }
      const end = Math.min(expires, ends);
      if (end - serverNow() > WARN_MS) {
        warning.hidden = true;
        return schedule(end - serverNow() - WARN_MS);
      }
      const limit = ends <= expires;
      const minutes = Math.max(1, Math.round((end - serverNow()) / 60000));
      const inWords = minutes === 1 ? "1 minute" : `${minutes} minutes`;
      text.textContent = limit
        ? `Your session reaches its time limit in ${inWords}; you will then need to log in again.`
        : `Your session ends in ${inWords} without activity.`;
      extend.hidden = limit;
      if (warning.hidden) {
        warning.hidden = false;
        (limit ? warning : extend).focus();
      }
      schedule(Math.min(60000, end - serverNow() + 1000));
    }
    warning.tabIndex = -1;
    extend.addEventListener("click", async () => {
      if (await session("/api/session").catch(() => false)) check();
      else ended();
    });
    schedule(Math.min(expires, ends) - serverNow() - WARN_MS);
  }
});
