// The upload's pure rules: the query fields sent with POST /upload from what the form holds,
// the problems to fix first, and the progress line (bytes, speed, time left). No DOM here.

import * as fmt from "./format.js";

/**
 * @typedef {object} FormValues the form's raw values
 * @property {string} minFrames
 * @property {string} maxFrames
 * @property {string} preset "", "fast", "full" or "custom"
 * @property {string} iterations
 * @property {boolean} autoTraining
 * @property {string} downSample "1", "2", "4" or "8"
 * @property {boolean} keepCheckpoint
 *
 * @typedef {{field: string, text: string}} Problem `field` names the FormValues key to fix
 */

/** The limits the server checks, so a bad value is caught before anything is sent. */
export const LIMITS = {
  frames: [3, 2000],
  iterations: [100, 200000],
};

/**
 * The upload's query fields, and the problems that stop it (first to fix first).
 * @param {FormValues} values
 * @returns {{params: Record<string, string|number>, problems: Problem[]}}
 */
export function uploadFields(values) {
  const params = {};
  const problems = [];
  const number = (field, name, [min, max]) => {
    const text = String(values[field] ?? "").trim();
    if (!text) return null;
    const value = Number(text);
    if (!Number.isInteger(value) || value < min || value > max) {
      problems.push({ field, text: `${name} must be a whole number from ${min} to ${max}.` });
      return null;
    }
    return value;
  };
  const minFrames = number("minFrames", "The least number of frames", LIMITS.frames);
  const maxFrames = number("maxFrames", "The largest number of frames", LIMITS.frames);
  if (minFrames != null && maxFrames != null && minFrames > maxFrames) {
    const text = "“At least” must not be more than “At most”.";
    problems.push({ field: "minFrames", text });
  }
  if (minFrames != null) params.min_frames = minFrames;
  if (maxFrames != null) params.max_frames = maxFrames;
  if (values.preset === "custom") {
    const iterations = number("iterations", "The number of steps", LIMITS.iterations);
    if (iterations == null && !problems.length) {
      problems.push({
        field: "iterations",
        text: "Enter the number of training steps (100 to 200,000).",
      });
    }
    if (iterations != null) params.iterations = iterations;
  } else if (values.preset) {
    params.preset = values.preset;
  }
  params.auto_training = values.autoTraining ? "true" : "false";
  if (values.downSample && values.downSample !== "1") {
    params.down_sample_factor = values.downSample;
  }
  if (values.keepCheckpoint) params.keep_checkpoint = "true";
  return { params, problems };
}

/**
 * The upload's progress line, "400 KiB of 883 KiB (45 %) · 450 KiB/s · 2 s left", with the
 * speed measured over the last 3 seconds of samples.
 */
export function createUploadMeter(windowMs = 3000) {
  const samples = [];
  return {
    /**
     * @param {number} loaded bytes of the file sent so far
     * @param {number} total the file's size
     * @param {number} now milliseconds (performance.now())
     */
    line(loaded, total, now) {
      samples.push([now, loaded]);
      while (samples.length > 2 && now - samples[0][0] > windowMs) samples.shift();
      const [t0, b0] = samples[0];
      const rate = now - t0 > 250 ? ((loaded - b0) * 1000) / (now - t0) : 0;
      const left = rate > 0 ? fmt.timeLeft((total - loaded) / rate) : "";
      const share = total ? Math.floor((100 * loaded) / total) : 0;
      const parts = [`${fmt.bytes(loaded)} of ${fmt.bytes(total)} (${share} %)`];
      if (rate > 0) parts.push(fmt.speed(rate));
      if (left) parts.push(left);
      return parts.join(" · ");
    },
  };
}

/** The headline of a refused upload, by HTTP status. */
export function uploadErrorTitle(status) {
  const titles = {
    401: "The token was refused.",
    413: "The video is too large.",
    415: "This file cannot be used.",
    422: "Check the settings.",
    507: "The server's disk is full.",
  };
  return titles[status] || "The upload failed.";
}
