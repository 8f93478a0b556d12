// A small, safe Markdown renderer for chat messages.
//
// It builds DOM nodes directly: text only ever becomes text nodes, and only the
// elements listed here are ever created, so HTML in a message (`<img onerror=...>`,
// `<script>`) is shown as the characters it is. Links keep only http(s) and mailto
// targets. Supported: paragraphs (a single newline is a line break), fenced code
// blocks (an unclosed fence, as while streaming, runs to the end), headings, lists
// (nested by indentation), block quotes, rules, inline code, bold, italic,
// strikethrough, links and bare URLs, images (as a link named by their alt text:
// the page never loads them), backslash escapes.
//
// `plainText` and `plainTitle` read the same rendering back as the text a person
// sees, for places that take no markup (a conversation's title).

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])\s+(.*)$/;
const URL_START = /https?:\/\/[^\s<>"'`]+/y;
const SAFE_URL = /^(https?:\/\/|mailto:)/i;

/** Render Markdown text into a DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}

const BLOCKS = new Set(["P", "PRE", "LI", "UL", "OL", "BLOCKQUOTE", "HR", "H3", "H4", "H5", "H6"]);

/** Markdown `text` as the plain text a person reads: marks gone, links as their
 * text, one line per block or line break. */
export function plainText(text) {
  const lines = [""];
  const walk = (node) => {
    for (const child of node.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) {
        const [first, ...rest] = child.data.split("\n");
        lines[lines.length - 1] += first;
        lines.push(...rest); // the lines of a code block
      } else if (child.nodeName === "BR") {
        lines.push("");
      } else if (BLOCKS.has(child.nodeName)) {
        lines.push(""); // empty lines are dropped below
        walk(child);
        lines.push("");
      } else {
        walk(child);
      }
    }
  };
  walk(renderMarkdown(text));
  return lines.map((line) => line.replace(/\s+/g, " ").trim()).filter(Boolean).join("\n");
}

/** A title for a conversation whose first message is `text`: the first line a person
 * reads in it, at most `max` characters; "" when it has no text. */
export function plainTitle(text, max = 80) {
  const first = plainText(text).split("\n", 1)[0];
  const chars = [...first];
  return chars.length > max ? `${chars.slice(0, max - 1).join("").trimEnd()}…` : first;
}

function el(tag, ...children) {
  const node = document.createElement(tag);
  for (const child of children) node.append(child);
  return node;
}

function blank(line) {
  return line.trim() === "";
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (blank(line)) {
      i += 1;
    } else if ((m = FENCE.exec(line))) {
      i = fence(lines, i + 1, m, parent);
    } else if ((m = HEADING.exec(line))) {
      parent.append(el(`h${Math.min(6, m[1].length + 2)}`, inline(m[2])));
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(document.createElement("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        inner.push(m[1]);
        i += 1;
      }
      const quote = document.createElement("blockquote");
      blocks(inner, quote);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent);
    } else {
      const para = [];
      while (i < lines.length && !blank(lines[i]) && !(para.length && startsBlock(lines[i]))) {
        para.push(lines[i].trim());
        i += 1;
      }
      parent.append(el("p", inline(para.join("\n"))));
    }
  }
}

function fence(lines, i, open, parent) {
  const marker = open[1];
  const body = [];
  while (i < lines.length && !lines[i].trim().startsWith(marker)) {
    body.push(lines[i]);
    i += 1;
  }
  const code = el("code", body.join("\n"));
  if (open[2]) code.className = `language-${open[2]}`;
  parent.append(el("pre", code));
  return i + 1; // past the closing fence (or the end)
}

function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = document.createElement(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let loose = false;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    const inner = indent + m[2].length + 1;
    i += 1;
    // The item's own lines: indented past its marker, or lazy continuation text.
    while (i < lines.length) {
      const line = lines[i];
      if (blank(line)) {
        const next = lines[i + 1];
        if (next === undefined || leading(next) < inner) break;
        loose = true;
        body.push("");
      } else if (leading(line) >= inner || (leading(line) > indent && ITEM.test(line))) {
        body.push(line.slice(Math.min(inner, leading(line))));
      } else if (!startsBlock(line) && !blank(lines[i - 1])) {
        body.push(line.trim());
      } else {
        break;
      }
      i += 1;
    }
    const item = document.createElement("li");
    blocks(body, item);
    if (!loose && item.childNodes.length >= 1 && item.firstChild.nodeName === "P") {
      item.firstChild.replaceWith(...item.firstChild.childNodes); // a tight item: no <p>
    }
    node.append(item);
    while (i < lines.length && blank(lines[i]) && lines[i + 1] !== undefined && ITEM.test(lines[i + 1])) {
      i += 1; // blank lines between items of the same list
    }
  }
  parent.append(node);
  return i;
}

function leading(line) {
  return line.length - line.trimStart().length;
}

// --------------------------------------------------------------------------- inline

const DELIMS = [
  ["**", "strong"],
  ["__", "strong"],
  ["~~", "del"],
  ["*", "em"],
  ["_", "em"],
];

/** Inline Markdown of one block, as a DocumentFragment. */
export function inline(src) {
  const out = document.createDocumentFragment();
  let text = "";
  const flush = () => {
    if (text) out.append(document.createTextNode(text));
    text = "";
  };
  const push = (node) => {
    flush();
    out.append(node);
  };
  let i = 0;
  while (i < src.length) {
    const c = src[i];
    if (c === "\\" && i + 1 < src.length && /[!-/:-@[-`{-~]/.test(src[i + 1])) {
      text += src[i + 1];
      i += 2;
      continue;
    }
    if (c === "\n") {
      push(document.createElement("br"));
      i += 1;
      continue;
    }
    if (c === "`") {
      const run = /^`+/.exec(src.slice(i))[0];
      const end = src.indexOf(run, i + run.length);
      if (end > i) {
        push(el("code", src.slice(i + run.length, end).replace(/\n/g, " ")));
        i = end + run.length;
        continue;
      }
      text += run;
      i += run.length;
      continue;
    }
    if (c === "[" || (c === "!" && src[i + 1] === "[")) {
      const link = parseLink(src, c === "!" ? i + 1 : i);
      if (link) {
        push(link.safe || c === "[" ? link.node : document.createTextNode(src.slice(i, link.end)));
        i = link.end;
        continue;
      }
    }
    if (c === "h" && (i === 0 || /[\s(]/.test(src[i - 1]))) {
      URL_START.lastIndex = i;
      const m = URL_START.exec(src);
      if (m) {
        const url = m[0].replace(/[.,;:!?)]+$/, "");
        push(anchor(url, document.createTextNode(url)));
        i += url.length;
        continue;
      }
    }
    const emphasis = parseEmphasis(src, i);
    if (emphasis) {
      push(emphasis.node);
      i = emphasis.end;
      continue;
    }
    text += c;
    i += 1;
  }
  flush();
  return out;
}

function parseEmphasis(src, i) {
  for (const [marker, tag] of DELIMS) {
    if (!src.startsWith(marker, i)) continue;
    const after = src[i + marker.length];
    if (after === undefined || /\s/.test(after)) return null; // "* " is not emphasis
    if (marker[0] === "_" && i > 0 && /\w/.test(src[i - 1])) return null; // snake_case
    let end = src.indexOf(marker, i + marker.length);
    while (end !== -1) {
      const before = src[end - 1];
      const next = src[end + marker.length];
      const closes = !/\s/.test(before) && !(marker[0] === "_" && next && /\w/.test(next));
      if (closes && !(marker.length === 1 && src[end + 1] === marker)) break;
      end = src.indexOf(marker, end + 1);
    }
    if (end === -1) return null;
    return { node: el(tag, inline(src.slice(i + marker.length, end))), end: end + marker.length };
  }
  return null;
}

function parseLink(src, i) {
  let depth = 0;
  let close = -1;
  for (let j = i; j < src.length; j += 1) {
    if (src[j] === "\\") j += 1;
    else if (src[j] === "[") depth += 1;
    else if (src[j] === "]" && --depth === 0) {
      close = j;
      break;
    }
  }
  if (close === -1 || src[close + 1] !== "(") return null;
  const end = src.indexOf(")", close + 2);
  if (end === -1) return null;
  const target = src.slice(close + 2, end).trim().split(/\s+/)[0] || "";
  // An unsafe target (javascript:, data:, a relative path) is shown as the text it is.
  const safe = SAFE_URL.test(target);
  const node = safe
    ? anchor(target, inline(src.slice(i + 1, close)))
    : document.createTextNode(src.slice(i, end + 1));
  return { node, safe, end: end + 1 };
}

function anchor(href, label) {
  const a = el("a", label);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}
