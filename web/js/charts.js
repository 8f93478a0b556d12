// A small live chart: the last N values of a figure as an SVG line and area, with a
// text alternative that says what it shows.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 240;
const HEIGHT = 48;

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
    svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
    svg.setAttribute("preserveAspectRatio", "none");
    this.area = document.createElementNS(NS, "path");
    this.area.setAttribute("class", "spark-area");
    this.line = document.createElementNS(NS, "polyline");
    this.line.setAttribute("class", "spark-line");
    svg.append(this.area, this.line);
    this.draw();
  }

  push(value) {
    this.values.push(value);
    if (this.values.length > this.points) this.values.shift();
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
    const now = values[values.length - 1];
    this.svg.setAttribute(
      "aria-label",
      `${this.label}: ${now} now, at most ${Math.max(...values)} over the last ${values.length} s`,
    );
  }
}
