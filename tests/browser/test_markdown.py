"""RilletMarkdown.render in the real browser: structure, safety, bounded work."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page

from .conftest import open_chat

RENDER = ("(src) => { const d = document.createElement('div');"
          " d.append(RilletMarkdown.render(src)); return d.innerHTML; }")
LINK = 'rel="noopener noreferrer nofollow" target="_blank"'

CASES = [
    ("a **b** c", "<p>a <strong>b</strong> c</p>"),
    ("*a **b** c*", "<p><em>a <strong>b</strong> c</em></p>"),
    ("***x***", "<p><em><strong>x</strong></em></p>"),
    ("snake_case_name and _em_", "<p>snake_case_name and <em>em</em></p>"),
    ("2 * 3 * 4", "<p>2 * 3 * 4</p>"),
    ("\\*not em\\*", "<p>*not em*</p>"),
    ("~~gone~~", "<p><del>gone</del></p>"),
    ("`a<b`", "<p><code>a&lt;b</code></p>"),
    ("```\nunterminated <b>", "<pre><code>unterminated &lt;b&gt;</code></pre>"),
    ("```js\nx\n```\nafter", '<pre data-lang="js"><code class="language-js">x</code></pre><p>after</p>'),
    ('```"><img src=x onerror=alert(1)>\nx\n```', '<pre data-lang="img"><code class="language-img">x</code></pre>'),
    ("# Title #", '<h3 class="md-h1">Title</h3>'),
    ("line1\nline2", "<p>line1<br>line2</p>"),
    ("- a\n  - b\n- c", "<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul>"),
    ("1. a\n   - b\n2. c", "<ol><li>a<ul><li>b</li></ul></li><li>c</li></ol>"),
    ("3. x\n4. y", '<ol start="3"><li>x</li><li>y</li></ol>'),
    ("- a\n\n- b", "<ul><li><p>a</p></li><li><p>b</p></li></ul>"),
    ("text\n- item", "<p>text</p><ul><li>item</li></ul>"),
    ("> quote\n> more", "<blockquote><p>quote<br>more</p></blockquote>"),
    ("---", "<hr>"),
    ("| a | b |\n|---|:-:|\n| 1 | 2 |",
     '<div class="md-table"><table><thead><tr><th>a</th><th class="align-center">b</th></tr></thead>'
     '<tbody><tr><td>1</td><td class="align-center">2</td></tr></tbody></table></div>'),
    ("see https://example.com.", f'<p>see <a href="https://example.com/" {LINK}>https://example.com</a>.</p>'),
    ("[x]( https://a.b/c \"t\" )", f'<p><a href="https://a.b/c" {LINK}>x</a></p>'),
    ("<https://x.org>", f'<p><a href="https://x.org/" {LINK}>https://x.org</a></p>'),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    ("[x](JaVaScRiPt:alert(1))", "<p>[x](JaVaScRiPt:alert(1))</p>"),
    ("[x](/relative)", "<p>[x](/relative)</p>"),
    ("[x](data:text/html,hi)", "<p>[x](data:text/html,hi)</p>"),
    ('[a](https://x.org/"onmouseover="alert(1))',
     f'<p><a href="https://x.org/%22onmouseover=%22alert(1)" {LINK}>a</a></p>'),
    ("<script>alert(1)</script>", "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"),
    ('<img src=x onerror="alert(1)">', '<p>&lt;img src=x onerror="alert(1)"&gt;</p>'),
]


@pytest.fixture
def md_page(page: Page, fake_server) -> Page:
    open_chat(page, fake_server)
    return page


def test_render_cases(md_page: Page):
    got = [(src, md_page.evaluate(RENDER, src)) for src, _ in CASES]
    mismatches = [(src, want, html) for (src, want), (_, html) in zip(CASES, got) if html != want]
    assert not mismatches, "\n".join(f"{s!r}\n  want {w}\n  got  {h}" for s, w, h in mismatches)


HOSTILE = [
    "*" * 20000 + "a",
    "[" * 5000,
    "**a " * 3000,
    "``a" * 5000,
    "> " * 3000 + "x",
    "".join("  " * i + "- x\n" for i in range(300)),
    "[a](" * 3000,
]


def test_hostile_input_renders_quickly(md_page: Page):
    for hostile in HOSTILE:
        start = time.monotonic()
        md_page.evaluate(RENDER, hostile)
        elapsed = time.monotonic() - start
        assert elapsed < 2.0, (hostile[:40], elapsed)
