// Build settings: the server serves dist/ (see nodegraph/server/app.py); `npm run dev` proxies the API.
import react from "@vitejs/plugin-react";
import { defineConfig } from "vitest/config";

export default defineConfig({
  plugins: [react()],
  build: { outDir: "dist", emptyOutDir: true, chunkSizeWarningLimit: 1024 },
  server: { proxy: { "/api": { target: "http://127.0.0.1:8188", ws: true } } },
  test: { environment: "node", include: ["src/**/*.test.ts"] },
});
