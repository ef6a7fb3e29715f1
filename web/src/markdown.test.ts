import { createElement } from "react";
import { renderToStaticMarkup } from "react-dom/server";
import { describe, expect, it } from "vitest";

import { Markdown, markdownBlocks } from "./markdown";

const html = (text: string) => renderToStaticMarkup(createElement(Markdown, { text }));

describe("note markdown", () => {
  it("reads headings, paragraphs, lists, quotes and code blocks", () => {
    expect(markdownBlocks("# Title\nsome text\non two lines\n\n- one\n- two\n1. first\n> quoted\n```\nx = 1\n```")).toEqual([
      { kind: "heading", level: 1, text: "Title" },
      { kind: "paragraph", text: "some text on two lines" },
      { kind: "list", ordered: false, items: ["one", "two"] },
      { kind: "list", ordered: true, items: ["first"] },
      { kind: "quote", text: "quoted" },
      { kind: "code", text: "x = 1" },
    ]);
  });

  it("draws inline markup, and nothing as HTML", () => {
    expect(html("**bold** and *it* and `code` and [site](https://example.com)")).toBe(
      '<p><strong>bold</strong> and <em>it</em> and <code>code</code> and '
      + '<a href="https://example.com" target="_blank" rel="noreferrer noopener">site</a></p>');
    expect(html("<img src=x onerror=alert(1)>")).toBe("<p>&lt;img src=x onerror=alert(1)&gt;</p>");
    expect(html("[click](javascript:alert(1))")).toBe("<p>[click](javascript:alert(1))</p>");
    expect(html("set filename_prefix_here")).toBe("<p>set filename_prefix_here</p>");
    expect(html("## Steps\n1. load\n2. run")).toBe("<h2>Steps</h2><ol><li>load</li><li>run</li></ol>");
  });
});
