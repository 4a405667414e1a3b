/* rillet: a small, safe Markdown renderer for model output.
 *
 * Safety rules (the whole point of this file):
 *  - It never parses HTML: the text only ever reaches the page through
 *    document.createTextNode / textContent, so "<script>" or "<img onerror>"
 *    in the input is shown literally.
 *  - It only creates elements from a fixed list of tag names, and only sets
 *    these attributes: href (http/https URLs checked with the URL parser),
 *    rel, target, class (a sanitized "language-*" name) and start (an integer).
 *  - Work is bounded: nesting depth is capped and closing-delimiter searches
 *    remember their failures, so a hostile text cannot make rendering hang.
 *
 * Supported: paragraphs (single newlines become <br>), ATX headings, fenced code
 * blocks (an unterminated fence runs to the end, which suits streaming), inline
 * code, **bold**, *italic*, ***both***, ~~strike~~, bullet and ordered lists
 * (nested by indentation), blockquotes, horizontal rules, simple GFM tables,
 * [links](https://...) and bare http(s) URLs, backslash escapes.
 *
 * API: RilletMarkdown.render(text) -> DocumentFragment
 *      RilletMarkdown.safeUrl(text) -> normalized http(s) URL string or null
 */
(function (global) {
  "use strict";

  var MAX_BLOCK_DEPTH = 8;
  var MAX_INLINE_DEPTH = 8;
  var MAX_LINK_LABEL = 1000;
  var MAX_LINK_URL = 2048;
  var ESCAPABLE = "\\`*_{}[]()#+-.!|~<>\"'";

  var FENCE_RE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^\s`]*)[^`]*$/;
  var FENCE_CLOSE_RE = /^ {0,3}(`{3,}|~{3,})[ \t]*$/;
  var HEADING_RE = /^ {0,3}(#{1,6})(?:[ \t]+(.*))?$/;
  var HR_RE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  var QUOTE_RE = /^ {0,3}> ?(.*)$/;
  var LIST_RE = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
  var TABLE_DELIM_RE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
  var AUTOLINK_RE = /https?:\/\/[^\s<>"'`]+/y;
  var ANGLE_LINK_RE = /<(https?:\/\/[^\s<>]+)>/y;

  function el(tag) {
    return document.createElement(tag);
  }

  function text(s) {
    return document.createTextNode(s);
  }

  function isBlank(line) {
    return /^[ \t]*$/.test(line);
  }

  function indentOf(line) {
    return line.length - line.replace(/^ +/, "").length;
  }

  /* An absolute http(s) URL, normalized by the URL parser, or null. */
  function safeUrl(raw) {
    if (typeof raw !== "string" || raw.length > MAX_LINK_URL) return null;
    var candidate = raw.trim();
    if (candidate.charAt(0) === "<" && candidate.charAt(candidate.length - 1) === ">") {
      candidate = candidate.slice(1, -1);
    }
    if (!/^https?:\/\//i.test(candidate)) return null;
    var url;
    try {
      url = new URL(candidate);
    } catch (e) {
      return null;
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") return null;
    return url.href;
  }

  function makeLink(href) {
    var a = el("a");
    a.setAttribute("href", href);
    a.setAttribute("rel", "noopener noreferrer nofollow");
    a.setAttribute("target", "_blank");
    return a;
  }

  /* ---------------------------------------------------------------- inline */

  function runLength(s, i, ch) {
    var j = i;
    while (j < s.length && s.charAt(j) === ch) j++;
    return j - i;
  }

  /* Find the start of a closing delimiter run for `ch` repeated `want` times
   * (1, 2 or 3), searching from `from`. A closer must follow a non-space
   * character; for "_" it must not be followed by a letter or digit.
   * Runs shorter than `want` are skipped (they belong to nested emphasis).
   * Returns the index where the closing `want` characters start, or -1. */
  function findCloser(s, from, ch, want, memo) {
    var key = ch + want;
    if (memo[key] !== undefined && from >= memo[key]) return -1;
    var j = from;
    while (j < s.length) {
      j = s.indexOf(ch, j);
      if (j < 0) break;
      var run = runLength(s, j, ch);
      var prev = s.charAt(j - 1);
      var after = s.charAt(j + run);
      var ok = j > from && prev !== "" && !/\s/.test(prev) &&
        !(ch === "_" && /[A-Za-z0-9]/.test(after));
      if (ok && (run === want || (want >= 2 && run > want) || (want === 1 && run === 3))) {
        // e.g. "**a *b***": the closing "**" are the last two characters of the run
        return j + run - want;
      }
      j += run;
    }
    if (memo[key] === undefined || from < memo[key]) memo[key] = from;
    return -1;
  }

  /* Index of the "]" closing the "[" at `i`, or -1. */
  function findLabelEnd(s, i) {
    var depth = 0;
    var limit = Math.min(s.length, i + MAX_LINK_LABEL);
    for (var j = i; j < limit; j++) {
      var c = s.charAt(j);
      if (c === "\\") {
        j++;
      } else if (c === "[") {
        depth++;
      } else if (c === "]") {
        depth--;
        if (depth === 0) return j;
      }
    }
    return -1;
  }

  /* Index of the ")" closing the "(" at `i`, or -1 (parentheses may nest). */
  function findUrlEnd(s, i) {
    var depth = 0;
    var limit = Math.min(s.length, i + MAX_LINK_URL);
    for (var j = i; j < limit; j++) {
      var c = s.charAt(j);
      if (c === "\n") return -1;
      if (c === "(") depth++;
      else if (c === ")") {
        depth--;
        if (depth === 0) return j;
      }
    }
    return -1;
  }

  function trimAutolink(url) {
    // Trailing punctuation is almost always the sentence, not the URL.
    for (;;) {
      var last = url.charAt(url.length - 1);
      if (".,;:!?*_~".indexOf(last) >= 0) {
        url = url.slice(0, -1);
      } else if (last === ")" && (url.split("(").length < url.split(")").length)) {
        url = url.slice(0, -1);
      } else {
        return url;
      }
    }
  }

  function renderInline(s, parent, depth, inLink) {
    var buf = "";
    var memo = {};
    var n = s.length;
    var i = 0;

    function flush() {
      if (buf) {
        parent.appendChild(text(buf));
        buf = "";
      }
    }

    function wrap(tag, inner) {
      var node = el(tag);
      if (depth >= MAX_INLINE_DEPTH) node.appendChild(text(inner));
      else renderInline(inner, node, depth + 1, inLink);
      return node;
    }

    while (i < n) {
      var c = s.charAt(i);

      if (c === "\\" && i + 1 < n && ESCAPABLE.indexOf(s.charAt(i + 1)) >= 0) {
        buf += s.charAt(i + 1);
        i += 2;
        continue;
      }

      if (c === "\n") {
        flush();
        parent.appendChild(el("br"));
        i++;
        continue;
      }

      if (c === "`") {
        var ticks = runLength(s, i, "`");
        var close = -1;
        var k = i + ticks;
        var tickKey = "`" + ticks;
        if (memo[tickKey] === undefined || k < memo[tickKey]) {
          while ((k = s.indexOf("`", k)) >= 0) {
            var r = runLength(s, k, "`");
            if (r === ticks) {
              close = k;
              break;
            }
            k += r;
          }
          if (close < 0) memo[tickKey] = i + ticks;
        }
        if (close >= 0) {
          flush();
          var code = s.slice(i + ticks, close).replace(/\n/g, " ");
          if (code.length > 2 && code.charAt(0) === " " && code.charAt(code.length - 1) === " " && code.trim()) {
            code = code.slice(1, -1);
          }
          var codeEl = el("code");
          codeEl.textContent = code;
          parent.appendChild(codeEl);
          i = close + ticks;
        } else {
          buf += s.slice(i, i + ticks);
          i += ticks;
        }
        continue;
      }

      if (c === "*" || c === "_" || c === "~") {
        var run = runLength(s, i, c);
        var next = s.charAt(i + run);
        var prev = s.charAt(i - 1);
        var canOpen = next !== "" && !/\s/.test(next) && !(c === "_" && /[A-Za-z0-9]/.test(prev));
        var handled = false;
        if (canOpen && c === "~") {
          if (run === 2) {
            var endStrike = findCloser(s, i + 2, "~", 2, memo);
            if (endStrike >= 0) {
              flush();
              parent.appendChild(wrap("del", s.slice(i + 2, endStrike)));
              i = endStrike + 2;
              handled = true;
            }
          }
        } else if (canOpen && run >= 3) {
          var end3 = findCloser(s, i + 3, c, 3, memo);
          if (end3 >= 0) {
            flush();
            var em3 = el("em");
            em3.appendChild(wrap("strong", s.slice(i + 3, end3)));
            parent.appendChild(em3);
            i = end3 + 3;
            handled = true;
          }
        } else if (canOpen && run === 2) {
          var end2 = findCloser(s, i + 2, c, 2, memo);
          if (end2 >= 0) {
            flush();
            parent.appendChild(wrap("strong", s.slice(i + 2, end2)));
            i = end2 + 2;
            handled = true;
          }
        } else if (canOpen && run === 1) {
          var end1 = findCloser(s, i + 1, c, 1, memo);
          if (end1 >= 0) {
            flush();
            parent.appendChild(wrap("em", s.slice(i + 1, end1)));
            i = end1 + 1;
            handled = true;
          }
        }
        if (!handled) {
          // Not emphasis: keep the whole run as text (an opener of 3 may still
          // be "**" + "*" in other Markdown dialects; literal is the safe side).
          buf += s.slice(i, i + run);
          i += run;
        }
        continue;
      }

      if (c === "[" && !inLink) {
        var labelEnd = findLabelEnd(s, i);
        if (labelEnd > i && s.charAt(labelEnd + 1) === "(") {
          var urlEnd = findUrlEnd(s, labelEnd + 1);
          if (urlEnd > 0) {
            var target = s.slice(labelEnd + 2, urlEnd).trim();
            // Drop an optional title: [x](https://a "title")
            var title = /^(\S+)\s+("[^"]*"|'[^']*')$/.exec(target);
            if (title) target = title[1];
            var href = safeUrl(target);
            if (href) {
              flush();
              var a = makeLink(href);
              var label = s.slice(i + 1, labelEnd);
              if (depth >= MAX_INLINE_DEPTH) a.appendChild(text(label));
              else renderInline(label, a, depth + 1, true);
              parent.appendChild(a);
              i = urlEnd + 1;
              continue;
            }
            // Unsafe or relative target (javascript:, data:, ...): show the source as text.
            buf += s.slice(i, urlEnd + 1);
            i = urlEnd + 1;
            continue;
          }
        }
        buf += c;
        i++;
        continue;
      }

      if (c === "<" && !inLink) {
        ANGLE_LINK_RE.lastIndex = i;
        var angle = ANGLE_LINK_RE.exec(s);
        var angleHref = angle && safeUrl(angle[1]);
        if (angleHref) {
          flush();
          var aa = makeLink(angleHref);
          aa.textContent = angle[1];
          parent.appendChild(aa);
          i += angle[0].length;
          continue;
        }
        buf += c;
        i++;
        continue;
      }

      if ((c === "h" || c === "H") && !inLink && !/[A-Za-z0-9]/.test(s.charAt(i - 1))) {
        AUTOLINK_RE.lastIndex = i;
        var auto = AUTOLINK_RE.exec(s);
        if (auto) {
          var raw = trimAutolink(auto[0]);
          var autoHref = safeUrl(raw);
          if (autoHref && raw.length > 8) {
            flush();
            var al = makeLink(autoHref);
            al.textContent = raw;
            parent.appendChild(al);
            i += raw.length;
            continue;
          }
        }
      }

      buf += c;
      i++;
    }
    flush();
  }

  /* ---------------------------------------------------------------- blocks */

  function startsBlock(line) {
    return FENCE_RE.test(line) || HEADING_RE.test(line) || HR_RE.test(line) ||
      QUOTE_RE.test(line) || LIST_RE.test(line);
  }

  function splitRow(line) {
    var row = line.trim();
    if (row.charAt(0) === "|") row = row.slice(1);
    if (row.charAt(row.length - 1) === "|" && row.charAt(row.length - 2) !== "\\") row = row.slice(0, -1);
    var cells = [];
    var cur = "";
    for (var i = 0; i < row.length; i++) {
      var c = row.charAt(i);
      if (c === "\\" && row.charAt(i + 1) === "|") {
        cur += "|";
        i++;
      } else if (c === "|") {
        cells.push(cur.trim());
        cur = "";
      } else {
        cur += c;
      }
    }
    cells.push(cur.trim());
    return cells;
  }

  function renderTable(lines, start, parent, depth) {
    var header = splitRow(lines[start]);
    var aligns = splitRow(lines[start + 1]).map(function (d) {
      var left = d.charAt(0) === ":";
      var right = d.charAt(d.length - 1) === ":";
      return left && right ? "center" : right ? "right" : left ? "left" : "";
    });
    var wrapper = el("div");
    wrapper.className = "md-table";
    var table = el("table");
    var thead = el("thead");
    var tr = el("tr");
    header.forEach(function (cell, idx) {
      var th = el("th");
      if (aligns[idx]) th.className = "align-" + aligns[idx];
      renderInline(cell, th, depth, false);
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    table.appendChild(thead);
    var tbody = el("tbody");
    var i = start + 2;
    while (i < lines.length && !isBlank(lines[i]) && lines[i].indexOf("|") >= 0) {
      var cells = splitRow(lines[i]);
      var row = el("tr");
      for (var c = 0; c < header.length; c++) {
        var td = el("td");
        if (aligns[c]) td.className = "align-" + aligns[c];
        renderInline(cells[c] || "", td, depth, false);
        row.appendChild(td);
      }
      tbody.appendChild(row);
      i++;
    }
    table.appendChild(tbody);
    wrapper.appendChild(table);
    parent.appendChild(wrapper);
    return i;
  }

  function renderList(lines, start, parent, depth) {
    var first = LIST_RE.exec(lines[start]);
    var baseIndent = first[1].length;
    var ordered = /\d/.test(first[2].charAt(0));
    var list = el(ordered ? "ol" : "ul");
    if (ordered) {
      var number = parseInt(first[2], 10);
      if (isFinite(number) && number !== 1) list.setAttribute("start", String(number));
    }
    var items = [];
    var current = null;
    var loose = false;
    var i = start;
    while (i < lines.length) {
      var line = lines[i];
      var m = LIST_RE.exec(line);
      if (m && m[1].length <= baseIndent + 1) {
        if (/\d/.test(m[2].charAt(0)) !== ordered) break;
        var markerWidth = m[1].length + m[2].length + 1;
        current = { lines: [m[3] || ""], contentIndent: markerWidth };
        items.push(current);
        i++;
        continue;
      }
      if (isBlank(line)) {
        // A blank line continues the list only if more of it follows.
        var j = i + 1;
        while (j < lines.length && isBlank(lines[j])) j++;
        if (j >= lines.length) break;
        var nm = LIST_RE.exec(lines[j]);
        var sameList = nm && nm[1].length <= baseIndent + 1 && /\d/.test(nm[2].charAt(0)) === ordered;
        if (!sameList && indentOf(lines[j]) < baseIndent + 2) break;
        loose = true;
        for (; i < j; i++) current.lines.push("");
        continue;
      }
      var indent = indentOf(line);
      if (indent >= baseIndent + 2) {
        current.lines.push(line.slice(Math.min(indent, current.contentIndent)));
        i++;
        continue;
      }
      // Lazy continuation of the item's paragraph.
      if (!startsBlock(line) && !isBlank(lines[i - 1])) {
        current.lines.push(line.trim());
        i++;
        continue;
      }
      break;
    }
    items.forEach(function (item) {
      var li = el("li");
      renderBlocks(item.lines, li, depth + 1);
      if (!loose) {
        // Tight list: no paragraph boxes inside the items.
        Array.prototype.slice.call(li.children).forEach(function (child) {
          if (child.tagName === "P") {
            while (child.firstChild) li.insertBefore(child.firstChild, child);
            li.removeChild(child);
          }
        });
      }
      list.appendChild(li);
    });
    parent.appendChild(list);
    return i;
  }

  function renderBlocks(lines, parent, depth) {
    if (depth > MAX_BLOCK_DEPTH) {
      var flat = el("p");
      flat.textContent = lines.join("\n");
      parent.appendChild(flat);
      return;
    }
    var i = 0;
    while (i < lines.length) {
      var line = lines[i];
      var m;
      if (isBlank(line)) {
        i++;
        continue;
      }

      if ((m = FENCE_RE.exec(line))) {
        var fenceIndent = m[1].length;
        var fence = m[2];
        var lang = m[3].replace(/[^\w+#.-]/g, "").slice(0, 32);
        var body = [];
        i++;
        while (i < lines.length) {
          var close = FENCE_CLOSE_RE.exec(lines[i]);
          if (close && close[1].charAt(0) === fence.charAt(0) && close[1].length >= fence.length) {
            i++;
            break;
          }
          var l = lines[i];
          body.push(l.slice(Math.min(fenceIndent, indentOf(l))));
          i++;
        }
        var pre = el("pre");
        var code = el("code");
        if (lang) {
          code.className = "language-" + lang;
          pre.setAttribute("data-lang", lang);
        }
        code.textContent = body.join("\n");
        pre.appendChild(code);
        parent.appendChild(pre);
        continue;
      }

      if ((m = HEADING_RE.exec(line))) {
        var level = m[1].length;
        var content = (m[2] || "").replace(/[ \t]+#+[ \t]*$/, "").replace(/^#+$/, "").trim();
        var h = el("h" + Math.min(level + 2, 6));
        h.className = "md-h" + level;
        renderInline(content, h, 0, false);
        parent.appendChild(h);
        i++;
        continue;
      }

      if (HR_RE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
        continue;
      }

      if (QUOTE_RE.test(line)) {
        var quoted = [];
        while (i < lines.length && !isBlank(lines[i])) {
          var qm = QUOTE_RE.exec(lines[i]);
          if (qm) quoted.push(qm[1]);
          else if (!startsBlock(lines[i])) quoted.push(lines[i]);
          else break;
          i++;
        }
        var bq = el("blockquote");
        renderBlocks(quoted, bq, depth + 1);
        parent.appendChild(bq);
        continue;
      }

      if (LIST_RE.test(line)) {
        i = renderList(lines, i, parent, depth);
        continue;
      }

      if (line.indexOf("|") >= 0 && i + 1 < lines.length && TABLE_DELIM_RE.test(lines[i + 1]) &&
          lines[i + 1].indexOf("-") >= 0 &&
          splitRow(line).length === splitRow(lines[i + 1]).length) {
        i = renderTable(lines, i, parent, depth);
        continue;
      }

      var para = [];
      while (i < lines.length && !isBlank(lines[i]) && (para.length === 0 || !startsBlock(lines[i]))) {
        para.push(lines[i].replace(/^[ \t]+/, "").replace(/[ \t]+$/, ""));
        i++;
      }
      var p = el("p");
      renderInline(para.join("\n"), p, 0, false);
      parent.appendChild(p);
    }
  }

  function render(source) {
    var fragment = document.createDocumentFragment();
    var src = String(source == null ? "" : source).replace(/\r\n?/g, "\n").replace(/\t/g, "    ");
    renderBlocks(src.split("\n"), fragment, 0);
    return fragment;
  }

  global.RilletMarkdown = Object.freeze({ render: render, safeUrl: safeUrl });
})(window);
