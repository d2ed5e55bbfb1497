// Keyboard shortcuts: each choice button lists its keys in data-keys ("1 a", "2 t", "3 b").
// Keys typed into the reason box are text, not choices.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const target = event.target;
  if (target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT")) return;
  for (const button of document.querySelectorAll("button[data-keys]")) {
    if (button.dataset.keys.split(" ").includes(event.key.toLowerCase())) {
      event.preventDefault();
      button.click();
      return;
    }
  }
});
