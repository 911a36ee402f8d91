variable "project" {
  description = "Google Cloud project id."
  type        = string
}

variable "region" {
  description = "Region of the worker VMs and the bucket (Seoul by default)."
  type        = string
  default     = "asia-northeast3"
}

variable "zone" {
  description = "Zone of the managed instance group; it must offer the GPU type."
  type        = string
  default     = "asia-northeast3-b"
}

variable "name" {
  description = "Prefix of the buckets, service accounts, instance template, group and autoscaler names. Pub/Sub names are fixed (jobs, chat, worker, worker-chat, jobs-dead, …): wrangler.toml and the worker's defaults name them."
  type        = string
  default     = "cheap-serve"
}

variable "machine_type" {
  description = "Worker VM type (g2 types come with NVIDIA L4 GPUs)."
  type        = string
  default     = "g2-standard-4"
}

variable "gpu_type" {
  description = "Accelerator attached to each worker VM."
  type        = string
  default     = "nvidia-l4"
}

variable "gpu_count" {
  type    = number
  default = 1
}

variable "worker_image" {
  description = "Boot image with the NVIDIA driver (a Deep Learning VM image family)."
  type        = string
  default     = "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-11-py310"
}

variable "worker_version" {
  description = "Release of batch-worker to run (the startup script installs it)."
  type        = string
}

variable "worker_url" {
  description = "URL (gs:// or https://) of the batch-worker release tarball."
  type        = string
}

variable "worker_sha256" {
  description = "sha256 of the release tarball."
  type        = string
}

variable "ort_url" {
  description = "URL of the ONNX Runtime GPU bundle (libonnxruntime with the CUDA provider and its CUDA libraries)."
  type        = string
}

variable "ort_sha256" {
  description = "sha256 of the ONNX Runtime GPU bundle."
  type        = string
}

variable "lm_url" {
  description = "URL (https:// or gs://) of the text-generation model bundle: a tar.gz of the folder with model.onnx, tokenizer.json, tokenizer_config.json and config.json at its top level. Empty: the worker release's models/lm."
  type        = string
  default     = ""
}

variable "lm_sha256" {
  description = "sha256 of the text-generation model bundle (required with lm_url)."
  type        = string
  default     = ""
}

variable "max_workers" {
  description = "Most worker VMs the autoscaler may run."
  type        = number
  default     = 2
}

variable "undelivered_per_worker" {
  description = "Undelivered job messages (shards) per worker the autoscaler aims for."
  type        = number
  default     = 20
}

variable "ack_deadline_seconds" {
  type    = number
  default = 60
}

variable "poison_limit" {
  description = "Worker-side quarantine after this many deliveries that stopped a worker (drains do not count), or twice as many that ended in an error it lived through."
  type        = number
  default     = 5
}

variable "max_delivery_attempts" {
  description = "The subscription's own dead-letter limit: the last resort, above 2 x poison_limit."
  type        = number
  default     = 15
}

variable "input_retention_days" {
  description = "Input files of input_uri jobs are deleted from the inputs bucket after this many days."
  type        = number
  default     = 7
}

variable "output_retention_days" {
  description = "Outputs (and worker chunks) are deleted from the bucket after this many days."
  type        = number
  default     = 30
}
