// Every visible text of the page below WCAG AA contrast (4.5:1; 3:1 for large text: 24 px, or 18.66 px bold):
// its colour (with the opacity of it and its ancestors) over the backgrounds behind it, composited.
// Inputs count by their value or placeholder; disabled controls are exempt, as WCAG says. Used by
// tests/test_newcomer_page.py through page.evaluate (the file is one function expression).
() => {
  const parse = c => { const m = c.match(/rgba?\(([^)]+)\)/); if (!m) return null;
    const p = m[1].split(/[ ,\/]+/).filter(Boolean).map(Number); return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const lum = ([r, g, b]) => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const over = (top, bottom) => { const a = top[3]; return [0, 1, 2].map(i => top[i] * a + bottom[i] * (1 - a)).concat([1]); };
  const background = el => {  // the colour behind el: its and its ancestors' backgrounds, composited
    const layers = [];
    for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
    }
    let bg = [255, 255, 255, 1];
    for (let i = layers.length - 1; i >= 0; i--) bg = over(layers[i], bg);
    return bg;
  };
  const opacity = el => { let o = 1; for (let e = el; e && e.nodeType === 1; e = e.parentElement) o *= Number(getComputedStyle(e).opacity); return o; };
  const visible = el => { const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none' && opacity(el) > 0.05; };
  const out = [];
  const check = (el, text, colour) => {
    const s = getComputedStyle(el);
    let fg = parse(colour); if (!fg) return;
    const bg = background(el);
    fg = [fg[0], fg[1], fg[2], fg[3] * opacity(el)];
    const c = over(fg, bg);
    const [a, b] = [lum(c), lum(bg)];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(s.fontSize), bold = Number(s.fontWeight) >= 700;
    const large = size >= 24 || (size >= 18.66 && bold);
    const need = large ? 3 : 4.5;
    if (ratio < need) {
      const id = el.id || (el.closest('[id]') || {}).id || '';
      out.push({text: text.trim().slice(0, 50), ratio: Math.round(ratio * 100) / 100, need, tag: el.tagName.toLowerCase(),
                cls: String(el.className).slice(0, 60), near: id, fg: colour, bg: 'rgb(' + bg.slice(0, 3).map(Math.round).join(',') + ')', size});
    }
  };
  for (const el of document.querySelectorAll('body *')) {
    if (['SCRIPT', 'STYLE', 'NOSCRIPT', 'SVG', 'PATH'].includes(el.tagName) || !visible(el)) continue;
    if (el.closest('[disabled], [aria-disabled="true"]')) continue;  // inactive controls: no requirement
    if (el.tagName === 'INPUT' || el.tagName === 'TEXTAREA') {
      if (['checkbox', 'radio', 'range', 'file', 'hidden'].includes(el.type)) continue;
      if (el.value) check(el, el.value, getComputedStyle(el).color);
      else if (el.placeholder) check(el, el.placeholder, getComputedStyle(el, '::placeholder').color);
      continue;
    }
    const own = [...el.childNodes].filter(n => n.nodeType === 3 && n.textContent.trim()).map(n => n.textContent).join(' ');
    if (own) check(el, own, getComputedStyle(el).color);
  }
  return out;
}
