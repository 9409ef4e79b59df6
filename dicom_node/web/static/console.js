// The only script of the console: say why an image is missing instead of showing a broken icon.
document.addEventListener("DOMContentLoaded", () => {
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
});
