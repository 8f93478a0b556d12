// The dashboard's live charts: a sparkline that draws one value a second, and the
// per-second figures it draws. The figures are plain objects fed with times in
// milliseconds, so tests drive them without a page or a clock.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 240;
const HEIGHT = 48;

/**
 * The most of a count at once during each whole second. A count that goes up and
 * down again between two ticks of the page's timer still shows in its second:
 * each change raises its second's peak, and a second with no change carries the
 * count it started with. Times are milliseconds (Date.now()).
 */
export class PeakPerSecond {
  /**
   * @param {number} now  the time the count is first known
   * @param {{count?: number, keep?: number}} options  keep: the most closed seconds held
   */
  constructor(now, { count = 0, keep = 60 } = {}) {
    this.second = Math.floor(now / 1000);
    this.count = count;
    this.peak = count;
    this.keep = keep;
    this.closed = []; // peaks of whole seconds not yet taken, oldest first
  }

  /** The count is `count` from `now` on. */
  set(count, now) {
    this.advance(now);
    this.count = count;
    this.peak = Math.max(this.peak, count);
  }

  /** The count went up to `count` for a moment at `now` and is back where it was. */
  blip(count, now) {
    this.advance(now);
    this.peak = Math.max(this.peak, count);
  }

  /** The peaks of every whole second before `now`, oldest first, each given once. */
  take(now) {
    this.advance(now);
    const out = this.closed;
    this.closed = [];
    return out;
  }

  advance(now) {
    const second = Math.floor(now / 1000);
    if (second <= this.second) return; // the same second, or a clock that went back
    // A long gap (a sleeping laptop) is at most `keep` seconds of the current count.
    const gap = Math.min(second - this.second, this.keep);
    this.closed.push(this.peak);
    for (let i = 1; i < gap; i += 1) this.closed.push(this.count);
    if (this.closed.length > this.keep) this.closed.splice(0, this.closed.length - this.keep);
    this.second = second;
    this.peak = this.count;
  }
}

/** A small live chart: the last N values of a figure as an SVG line and area, with
 * a text alternative that says what it shows. */
export class Sparkline {
  /**
   * @param {SVGSVGElement} svg  an empty <svg role="img"> in the page
   * @param {{label: string, points?: number}} options
   */
  constructor(svg, { label, points = 60 }) {
    this.svg = svg;
    this.label = label;
    this.points = points;
    this.values = [];
    this.now = 0;
    svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
    svg.setAttribute("preserveAspectRatio", "none");
    this.area = document.createElementNS(NS, "path");
    this.area.setAttribute("class", "spark-area");
    this.line = document.createElementNS(NS, "polyline");
    this.line.setAttribute("class", "spark-line");
    svg.append(this.area, this.line);
    this.draw();
  }

  /** Add the values of the seconds just past, and say `now` is the figure now. */
  push(values, now = values.length ? values[values.length - 1] : this.now) {
    this.values.push(...values);
    if (this.values.length > this.points) this.values.splice(0, this.values.length - this.points);
    this.now = now;
    this.draw();
  }

  draw() {
    const values = this.values.length ? this.values : [0];
    const max = Math.max(1, ...values);
    const step = WIDTH / Math.max(1, this.points - 1);
    const offset = (this.points - values.length) * step; // new values enter on the right
    const coords = values.map((v, i) => [offset + i * step, HEIGHT - 2 - (v / max) * (HEIGHT - 4)]);
    const line = coords.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    this.line.setAttribute("points", line);
    const first = coords[0][0].toFixed(1);
    const last = coords[coords.length - 1][0].toFixed(1);
    this.area.setAttribute("d", `M${first},${HEIGHT} L${line.replaceAll(" ", " L")} L${last},${HEIGHT} Z`);
    this.svg.setAttribute(
      "aria-label",
      `${this.label}: ${this.now} now, at most ${Math.max(...values)} over the last ${values.length} s`,
    );
  }
}
