// A server task object (GET /status/{id}) with the fields the page reads, for the unit tests.

let serial = 0;

/** A task like the server's, with `fields` replacing the defaults. */
export function makeTask(fields = {}) {
  serial += 1;
  const id = `00000000-0000-4000-8000-${String(serial).padStart(12, "0")}`;
  return {
    task_id: id,
    status: "pending",
    message: "Video uploaded",
    error_message: null,
    created_at: "2025-05-01T10:00:00Z",
    updated_at: "2025-05-01T10:00:00Z",
    started_at: null,
    finished_at: null,
    progress: null,
    queue_position: null,
    queued_for: null,
    expired: false,
    active: false,
    allowed_actions: ["delete"],
    results: { dataset: false, model: false },
    original_filename: "walk.mp4",
    video_size: 904192,
    attempts: 1,
    metadata: {},
    params: {
      min_frames: 20,
      max_frames: 100,
      iterations: 7000,
      down_sample_factor: 1,
      keep_checkpoint: false,
      auto_training: true,
    },
    ...fields,
  };
}

/** The milliseconds of an ISO time. */
export const at = (iso) => Date.parse(iso);
