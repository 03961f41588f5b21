// Line charts as SVG, drawn here: no charting library, no network. One chart plots any number of
// series over a shared step axis (the comparison overlays runs this way).

import { formatNumber, h, svg } from "./dom.js";

const WIDTH = 560;
const HEIGHT = 220;
const MARGIN = { left: 60, right: 14, top: 12, bottom: 34 };
export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];

// Tick values at round steps (1, 2 or 5 × 10^n) covering [low, high].
export function ticks(low, high, count = 5) {
  const rough = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough);
  const values = [];
  for (let t = Math.ceil(low / step) * step; t <= high + step * 1e-9; t += step) values.push(+t.toPrecision(12));
  return values;
}

// A span that is never empty, so a single point or a flat series still gets an axis.
function span(values) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (low === high) {
    const pad = Math.abs(low) * 0.1 || 1;
    low -= pad;
    high += pad;
  }
  return [low, high];
}

// series: [{name, points: [[step, value], ...]}]. The figure carries `data-points` (all points
// drawn), which tests read to see a live curve grow.
export function lineChart({ id, title, series, xLabel = "step" }) {
  const all = series.flatMap((s) => s.points);
  const figure = h("figure", { class: "chart", id, "data-points": all.length }, h("figcaption", {}, title));
  if (!all.length) {
    figure.append(h("p", { class: "empty" }, "no points yet"));
    return figure;
  }

  const [x0, x1] = span(all.map((p) => p[0]));
  const [y0, y1] = span(all.map((p) => p[1]));
  const x = (v) => MARGIN.left + ((v - x0) / (x1 - x0)) * (WIDTH - MARGIN.left - MARGIN.right);
  const y = (v) => HEIGHT - MARGIN.bottom - ((v - y0) / (y1 - y0)) * (HEIGHT - MARGIN.top - MARGIN.bottom);
  const plot = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": title });

  for (const t of ticks(y0, y1).filter((t) => t >= y0 && t <= y1)) {
    plot.append(svg("line", { class: "grid", x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(t), y2: y(t) }),
      svg("text", { class: "tick", x: MARGIN.left - 6, y: y(t) + 4, "text-anchor": "end" }, formatNumber(t, 6)));
  }
  for (const t of ticks(x0, x1).filter((t) => t >= x0 && t <= x1)) {
    plot.append(svg("text", { class: "tick", x: x(t), y: HEIGHT - MARGIN.bottom + 16, "text-anchor": "middle" },
      formatNumber(t, 6)));
  }
  plot.append(svg("text", { class: "axis-label", x: WIDTH - MARGIN.right, y: HEIGHT - 4, "text-anchor": "end" }, xLabel),
    svg("line", { class: "axis", x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom }),
    svg("line", { class: "axis", x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: HEIGHT - MARGIN.bottom,
      y2: HEIGHT - MARGIN.bottom }));

  series.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    plot.append(svg("polyline", { class: "series", "data-series": s.name, "data-points": s.points.length,
      stroke: color, points: s.points.map(([px, py]) => `${x(px)},${y(py)}`).join(" ") }));
    for (const [px, py] of s.points.length <= 80 ? s.points : []) {
      plot.append(svg("circle", { cx: x(px), cy: y(py), r: 2.5, fill: color },
        svg("title", {}, `${s.name}, ${xLabel} ${px}: ${formatNumber(py, 6)}`)));
    }
  });
  figure.append(plot);
  if (series.length > 1) {
    figure.append(h("ul", { class: "legend" }, series.map((s, i) => {
      const swatch = h("span", { class: "swatch" });
      swatch.style.background = PALETTE[i % PALETTE.length]; // CSSOM: allowed by the page's CSP
      return h("li", {}, swatch, s.name);
    })));
  }
  return figure;
}
