// The only script of the console. Every page works without it; it explains missing images and runs
// the automatic reloads, which therefore never come without the switch that stops them.
document.addEventListener("DOMContentLoaded", () => {
  // Say why an image is missing instead of showing a broken icon.
  for (const img of document.querySelectorAll("img[data-fallback]")) {
    const explain = () => {
      const note = document.createElement("div");
      note.className = "placeholder";
      note.textContent = img.dataset.fallback;
      img.replaceWith(note);
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
});
