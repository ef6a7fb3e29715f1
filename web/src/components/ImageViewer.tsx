// The image viewer: a run's images large over the editor, stepped through with the arrow keys or the
// buttons, downloaded, and the workflow that made them reopened. Escape or a click beside it closes.

import { useEffect } from "react";

import { actions, useEditor } from "../store";

/** The name an image URL downloads as: its last path segment. */
function fileName(url: string): string {
  const last = url.slice(url.lastIndexOf("/") + 1);
  try {
    return decodeURIComponent(last);
  } catch {
    return last;  // a malformed %-escape: the segment as written is still a usable name
  }
}

export function ImageViewer() {
  const viewer = useEditor((s) => s.viewer);
  const open = viewer !== null;
  useEffect(() => {
    if (!open) return;
    const onKey = (event: KeyboardEvent) => {
      if (event.key === "Escape") actions.closeViewer();
      else if (event.key === "ArrowRight") actions.stepViewer(1);
      else if (event.key === "ArrowLeft") actions.stepViewer(-1);
      else return;
      // Captured before the editor's shortcuts, which must not act behind the viewer.
      event.preventDefault();
      event.stopPropagation();
    };
    window.addEventListener("keydown", onKey, true);
    return () => window.removeEventListener("keydown", onKey, true);
  }, [open]);
  if (viewer === null) return null;
  const src = viewer.images[viewer.index];
  const name = fileName(src);
  const count = viewer.images.length;
  return (
    <div className="viewer-backdrop" onClick={actions.closeViewer}>
      <div className="viewer" data-testid="viewer" role="dialog" onClick={(event) => event.stopPropagation()}>
        <div className="viewer-bar">
          <span data-testid="viewer-count">{viewer.index + 1} / {count}</span>
          <span className="muted" title={name}>{name}</span>
          <a className="button" href={src} download={name} data-testid="viewer-download">Download</a>
          <button data-testid="viewer-workflow" title="open the workflow of the run that made it, in a new tab"
                  onClick={() => void actions.openRunWorkflow(viewer.runId)}>Open workflow</button>
          <button data-testid="viewer-close" title="close (Esc)" onClick={actions.closeViewer}>✕</button>
        </div>
        <div className="viewer-stage">
          <button className="viewer-step" data-testid="viewer-prev" title="previous (←)" disabled={count < 2}
                  onClick={() => actions.stepViewer(-1)}>‹</button>
          <img data-testid="viewer-image" src={src} alt={name} />
          <button className="viewer-step" data-testid="viewer-next" title="next (→)" disabled={count < 2}
                  onClick={() => actions.stepViewer(1)}>›</button>
        </div>
        {count > 1 && (
          <div className="viewer-strip">
            {viewer.images.map((image, index) => (
              <img key={image} src={image} alt="" className={index === viewer.index ? "current" : ""}
                   data-testid={`viewer-thumb-${index}`} onClick={() => actions.openViewer(viewer.images, index, viewer.runId)} />
            ))}
          </div>
        )}
      </div>
    </div>
  );
}
