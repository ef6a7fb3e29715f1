// The markdown of notes, drawn as React elements (never as HTML: a note cannot inject markup).
// Headings (#, ##, ###), paragraphs, - and 1. lists, > quotes, ``` code blocks; **bold**, *italic*,
// `code` and [links](https://...) within lines.

import { Fragment, type ReactNode } from "react";

export type Block =
  | { kind: "heading"; level: 1 | 2 | 3; text: string }
  | { kind: "paragraph"; text: string }
  | { kind: "list"; ordered: boolean; items: string[] }
  | { kind: "quote"; text: string }
  | { kind: "code"; text: string };

/** The blocks of a markdown text. */
export function markdownBlocks(text: string): Block[] {
  const blocks: Block[] = [];
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let paragraph: string[] = [];
  const flush = () => {
    if (paragraph.length > 0) blocks.push({ kind: "paragraph", text: paragraph.join(" ") });
    paragraph = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const heading = /^(#{1,3})\s+(.*)$/.exec(line);
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
    if (line.startsWith("```")) {
      flush();
      const code: string[] = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      blocks.push({ kind: "code", text: code.join("\n") });
    } else if (heading) {
      flush();
      blocks.push({ kind: "heading", level: heading[1].length as 1 | 2 | 3, text: heading[2] });
    } else if (bullet || numbered) {
      flush();
      const ordered = numbered !== null;
      const item = (bullet ?? numbered)![1];
      const last = blocks.at(-1);
      if (last?.kind === "list" && last.ordered === ordered) last.items.push(item);
      else blocks.push({ kind: "list", ordered, items: [item] });
    } else if (line.startsWith(">")) {
      flush();
      const last = blocks.at(-1);
      const quoted = line.replace(/^>\s?/, "");
      if (last?.kind === "quote") last.text += ` ${quoted}`;
      else blocks.push({ kind: "quote", text: quoted });
    } else if (line.trim() === "") {
      flush();
    } else {
      paragraph.push(line.trim());
    }
  }
  flush();
  return blocks;
}

// Underscores mark emphasis only outside words (snake_case names stay as they are).
const INLINE = /(\*\*[^*]+\*\*|(?<![A-Za-z0-9])__[^_]+__(?![A-Za-z0-9])|\*[^*\s][^*]*\*|(?<![A-Za-z0-9])_[^_\s][^_]*_(?![A-Za-z0-9])|`[^`]+`|\[[^\]]+\]\([^)\s]+\))/;

/** The inline markup of one block's text as React nodes. */
export function inline(text: string): ReactNode[] {
  const nodes: ReactNode[] = [];
  text.split(INLINE).forEach((part, i) => {
    if (part === "") return;
    if (/^(\*\*|__)/.test(part) && part.length > 4) nodes.push(<strong key={i}>{inline(part.slice(2, -2))}</strong>);
    else if (/^[*_]/.test(part) && part.length > 2 && /[*_]$/.test(part)) nodes.push(<em key={i}>{inline(part.slice(1, -1))}</em>);
    else if (part.startsWith("`") && part.endsWith("`") && part.length > 2) nodes.push(<code key={i}>{part.slice(1, -1)}</code>);
    else if (part.startsWith("[")) {
      const link = /^\[([^\]]+)\]\(([^)\s]+)\)$/.exec(part);
      // Only web addresses become links (no javascript: and the like).
      if (link && /^https?:\/\//i.test(link[2])) {
        nodes.push(<a key={i} href={link[2]} target="_blank" rel="noreferrer noopener">{link[1]}</a>);
      } else {
        nodes.push(<Fragment key={i}>{part}</Fragment>);
      }
    } else nodes.push(<Fragment key={i}>{part}</Fragment>);
  });
  return nodes;
}

export function Markdown({ text }: { text: string }) {
  return (
    <>
      {markdownBlocks(text).map((block, i) => {
        switch (block.kind) {
          case "heading": {
            const Tag = (["h1", "h2", "h3"] as const)[block.level - 1];
            return <Tag key={i}>{inline(block.text)}</Tag>;
          }
          case "paragraph":
            return <p key={i}>{inline(block.text)}</p>;
          case "quote":
            return <blockquote key={i}>{inline(block.text)}</blockquote>;
          case "code":
            return <pre key={i}><code>{block.text}</code></pre>;
          case "list": {
            const items = block.items.map((item, j) => <li key={j}>{inline(item)}</li>);
            return block.ordered ? <ol key={i}>{items}</ol> : <ul key={i}>{items}</ul>;
          }
        }
      })}
    </>
  );
}
