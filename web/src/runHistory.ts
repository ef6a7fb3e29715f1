// What the history panel shows of a past run beside its images (its prompt comes from the server: the
// run's `prompt` in GET /api/runs): its time.

/** A run's time for the list: the time of day today, else the date and time. */
export function runTime(seconds: number, now: Date = new Date()): string {
  const when = new Date(seconds * 1000);
  const pad = (n: number) => String(n).padStart(2, "0");
  const clock = `${pad(when.getHours())}:${pad(when.getMinutes())}`;
  const sameDay = when.getFullYear() === now.getFullYear() && when.getMonth() === now.getMonth() && when.getDate() === now.getDate();
  return sameDay ? clock : `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())} ${clock}`;
}
