// The toolbar's message: news or an error, cleared after a while or when clicked.

import { set } from "./editorState";

/** How long the toolbar shows news, and an error (longer: it may need reading twice). Clicking dismisses either. */
export const MESSAGE_MS = { news: 6000, error: 20_000 };
let messageTimer: ReturnType<typeof setTimeout> | undefined;

export function say(text: string, error = false): void {
  clearTimeout(messageTimer);
  set({ message: { text, error } });
  messageTimer = setTimeout(() => set({ message: null }), error ? MESSAGE_MS.error : MESSAGE_MS.news);
}

export function dismissMessage(): void {
  clearTimeout(messageTimer);
  set({ message: null });
}
