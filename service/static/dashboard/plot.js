/* darwinfront's plotting: small SVG scatter and line charts, no dependencies (shipped with the package).
 *
 *   DFPlot.chart(container, {
 *     series: [{name, className, points: [{x, y, id, data}], line: 'step' | 'line' | null}],
 *     xLabel, yLabel, xFormat, yFormat,            // formatters for tick labels (default: compact numbers)
 *     xIntegers,                                   // whole-number x ticks (generations)
 *     onHover(point, event), onLeave(), onClick(point, event),
 *   });
 *
 * Every point is one <circle> with the series' className, `data-index` and `data-id` (its `id`, if any); hover
 * and click handlers receive the point object as given (with its `data`).
 */
'use strict';
(function () {
  const SVG = 'http://www.w3.org/2000/svg';
  const COLOURS = ['#1f6feb', '#d1495b', '#2a9d8f', '#e9a03b', '#7b5ea7', '#5c6f7b', '#66a61e', '#e7298a'];

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceStep(span, count) {
    const raw = span / Math.max(count, 1);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const unit = raw / power;
    return (unit < 1.5 ? 1 : unit < 3 ? 2 : unit < 7 ? 5 : 10) * power;
  }

  // A padded [lo, hi] domain with round ticks inside it.
  function scale(values, count, integers) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (lo === hi) { const pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
    const pad = (hi - lo) * 0.06;
    lo -= pad; hi += pad;
    const step = integers ? Math.max(1, Math.round(niceStep(hi - lo, count))) : niceStep(hi - lo, count);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return { lo, hi, ticks };
  }

  function compact(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toPrecision(3) + 'G';
    if (a >= 1e6) return (v / 1e6).toPrecision(3) + 'M';
    if (a >= 1e4) return (v / 1e3).toPrecision(3) + 'k';
    if (a === 0) return '0';
    if (a < 1e-3) return v.toExponential(1);
    return String(+v.toPrecision(3));
  }

  function linePath(points, mode, sx, sy) {
    const sorted = points.slice().sort((a, b) => a.x - b.x);
    let d = '';
    sorted.forEach((p, i) => {
      if (i === 0) d += `M${sx(p.x)},${sy(p.y)}`;
      else if (mode === 'step') d += `H${sx(p.x)}V${sy(p.y)}`;
      else d += `L${sx(p.x)},${sy(p.y)}`;
    });
    return d;
  }

  function axes(svg, box, xs, ys, opts) {
    const { left, top, width, height } = box;
    const sx = (x) => left + ((x - xs.lo) / (xs.hi - xs.lo)) * width;
    const sy = (y) => top + height - ((y - ys.lo) / (ys.hi - ys.lo)) * height;
    const grid = el('g', { class: 'grid' }, svg);
    const xf = opts.xFormat || compact, yf = opts.yFormat || compact;
    for (const t of xs.ticks) {
      el('line', { x1: sx(t), x2: sx(t), y1: top, y2: top + height }, grid);
      el('text', { x: sx(t), y: top + height + 16, 'text-anchor': 'middle', class: 'tick' }, svg).textContent = xf(t);
    }
    for (const t of ys.ticks) {
      el('line', { x1: left, x2: left + width, y1: sy(t), y2: sy(t) }, grid);
      el('text', { x: left - 6, y: sy(t) + 4, 'text-anchor': 'end', class: 'tick' }, svg).textContent = yf(t);
    }
    el('rect', { x: left, y: top, width, height, class: 'frame' }, svg);
    el('text', { x: left + width / 2, y: top + height + 34, 'text-anchor': 'middle', class: 'axis-label' }, svg)
      .textContent = opts.xLabel || '';
    el('text', { x: 14, y: top + height / 2, 'text-anchor': 'middle', class: 'axis-label',
                 transform: `rotate(-90 14 ${top + height / 2})` }, svg).textContent = opts.yLabel || '';
    return { sx, sy };
  }

  function legend(svg, series, box) {
    if (series.length < 2) return;
    const g = el('g', { class: 'legend' }, svg);
    series.forEach((s, i) => {
      const x = box.left + 8 + i * 110;
      el('circle', { cx: x, cy: 10, r: 4, fill: s.colour }, g);
      el('text', { x: x + 8, y: 14 }, g).textContent = s.name;
    });
  }

  function chart(container, opts) {
    container.replaceChildren();
    const series = (opts.series || []).map((s, i) => Object.assign({ colour: COLOURS[i % COLOURS.length] }, s));
    const all = series.flatMap((s) => s.points);
    const width = Math.max(container.clientWidth || 0, 320), height = opts.height || 280;
    const svg = el('svg', { width, height, viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img' }, container);
    if (!all.length) {
      el('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle', class: 'empty' }, svg)
        .textContent = opts.empty || 'nothing yet';
      return svg;
    }
    const box = { left: 62, top: 22, width: width - 62 - 14, height: height - 22 - 44 };
    const xs = scale(all.map((p) => p.x), Math.max(2, Math.floor(box.width / 90)), opts.xIntegers);
    const ys = scale(all.map((p) => p.y), 5);
    const { sx, sy } = axes(svg, box, xs, ys, opts);
    legend(svg, series, box);
    for (const s of series) {
      if (s.line && s.points.length > 1) {
        el('path', { d: linePath(s.points, s.line, sx, sy), class: 'series-line', stroke: s.colour }, svg);
      }
      s.points.forEach((p, i) => {
        const dot = el('circle', { cx: sx(p.x), cy: sy(p.y), r: opts.radius || 5, fill: s.colour,
                                   class: `marker ${s.className || ''}`, 'data-index': i }, svg);
        if (p.id !== undefined) dot.setAttribute('data-id', String(p.id));
        if (opts.onHover) dot.addEventListener('mouseenter', (e) => opts.onHover(p, e));
        if (opts.onLeave) dot.addEventListener('mouseleave', () => opts.onLeave(p));
        if (opts.onClick) dot.addEventListener('click', (e) => opts.onClick(p, e));
      });
    }
    return svg;
  }

  window.DFPlot = { chart, compact };
})();
