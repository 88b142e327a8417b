// MathJax 3 configured for pymdownx.arithmatex (generic mode): it typesets only the
// .arithmatex spans and blocks, with the \( \) and \[ \] delimiters arithmatex writes.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// Material's instant navigation swaps pages without a reload: typeset each new page.
if (typeof document$ !== "undefined") {  // (Material defines document$)
  document$.subscribe(() => {
    if (!(window.MathJax && MathJax.startup && MathJax.startup.output)) return;  // not loaded yet: it typesets on load
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  });
}
