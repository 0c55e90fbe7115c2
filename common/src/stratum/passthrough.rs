//! ckpool's passthrough framing (in progress).
