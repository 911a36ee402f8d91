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

  validation {
    condition     = length(regexall("^[a-z]([-a-z0-9]{0,21}[a-z0-9])?$", var.name)) == 1
    error_message = "name must be 1 to 23 lower-case letters, digits or hyphens, start with a letter and not end with a hyphen: it prefixes the service account ids (6 to 30 characters), the bucket and the instance names."
  }
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
  description = "Accelerators per worker VM (g2-standard-4 comes with exactly one)."
  type        = number
  default     = 1

  validation {
    condition     = var.gpu_count >= 1 && floor(var.gpu_count) == var.gpu_count
    error_message = "gpu_count must be a whole number of at least 1."
  }
}

variable "worker_image" {
  description = "Boot image with the NVIDIA driver (a Deep Learning VM image family)."
  type        = string
  default     = "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-11-py310"
}

variable "worker_version" {
  description = "Release of batch-worker to run (the startup script installs it)."
  type        = string

  validation {
    condition     = length(regexall("^[0-9A-Za-z][-0-9A-Za-z._+]*$", var.worker_version)) == 1
    error_message = "worker_version must be letters, digits, '.', '_', '+' or '-', starting with a letter or digit: the startup script installs the release under a folder of that name."
  }
}

variable "worker_url" {
  description = "URL (gs:// or https://) of the batch-worker release tarball."
  type        = string

  validation {
    condition     = startswith(var.worker_url, "gs://") || startswith(var.worker_url, "https://")
    error_message = "worker_url must start with gs:// or https://."
  }
}

variable "worker_sha256" {
  description = "sha256 of the release tarball."
  type        = string

  validation {
    condition     = length(regexall("^[0-9a-f]{64}$", var.worker_sha256)) == 1
    error_message = "worker_sha256 must be 64 lower-case hex digits (sha256sum prints them)."
  }
}

variable "ort_url" {
  description = "URL of the ONNX Runtime GPU bundle (libonnxruntime with the CUDA provider and its CUDA libraries)."
  type        = string

  validation {
    condition     = startswith(var.ort_url, "gs://") || startswith(var.ort_url, "https://")
    error_message = "ort_url must start with gs:// or https://."
  }
}

variable "ort_sha256" {
  description = "sha256 of the ONNX Runtime GPU bundle."
  type        = string

  validation {
    condition     = length(regexall("^[0-9a-f]{64}$", var.ort_sha256)) == 1
    error_message = "ort_sha256 must be 64 lower-case hex digits (sha256sum prints them)."
  }
}

variable "lm_url" {
  description = "URL (https:// or gs://) of the text-generation model bundle: a tar.gz of the folder with model.onnx, tokenizer.json, tokenizer_config.json and config.json at its top level. Empty: the worker release's models/lm."
  type        = string
  default     = ""

  validation {
    condition     = var.lm_url == "" || startswith(var.lm_url, "gs://") || startswith(var.lm_url, "https://")
    error_message = "lm_url must be empty or start with gs:// or https://."
  }
}

variable "lm_sha256" {
  description = "sha256 of the text-generation model bundle (required with lm_url)."
  type        = string
  default     = ""

  validation {
    condition     = var.lm_sha256 == "" || length(regexall("^[0-9a-f]{64}$", var.lm_sha256)) == 1
    error_message = "lm_sha256 must be empty or 64 lower-case hex digits (sha256sum prints them)."
  }
}

variable "max_workers" {
  description = "Most worker VMs the autoscaler may run."
  type        = number
  default     = 2

  validation {
    condition     = var.max_workers >= 1 && floor(var.max_workers) == var.max_workers
    error_message = "max_workers must be a whole number of at least 1."
  }
}

variable "undelivered_per_worker" {
  description = "Undelivered job messages (shards) per worker the autoscaler aims for."
  type        = number
  default     = 20

  validation {
    condition     = var.undelivered_per_worker > 0
    error_message = "undelivered_per_worker must be above 0."
  }
}

variable "ack_deadline_seconds" {
  description = "Ack deadline of the worker subscriptions; the worker extends it while it holds a message."
  type        = number
  default     = 60

  validation {
    condition     = var.ack_deadline_seconds >= 10 && var.ack_deadline_seconds <= 600 && floor(var.ack_deadline_seconds) == var.ack_deadline_seconds
    error_message = "ack_deadline_seconds must be a whole number from 10 to 600 (Pub/Sub's range)."
  }
}

variable "poison_limit" {
  description = "Worker-side quarantine after this many deliveries that stopped a worker (drains do not count), or twice as many that ended in an error it lived through."
  type        = number
  default     = 5

  validation {
    condition     = var.poison_limit >= 1 && floor(var.poison_limit) == var.poison_limit
    error_message = "poison_limit must be a whole number of at least 1."
  }
}

variable "max_delivery_attempts" {
  description = "The subscription's own dead-letter limit: the last resort, above 2 x poison_limit."
  type        = number
  default     = 15

  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100 && floor(var.max_delivery_attempts) == var.max_delivery_attempts
    error_message = "max_delivery_attempts must be a whole number from 5 to 100 (Pub/Sub's range)."
  }
}

variable "input_retention_days" {
  description = "Input files of input_uri jobs are deleted from the inputs bucket after this many days."
  type        = number
  default     = 7

  validation {
    condition     = var.input_retention_days >= 1 && floor(var.input_retention_days) == var.input_retention_days
    error_message = "input_retention_days must be a whole number of days, at least 1."
  }
}

variable "output_retention_days" {
  description = "Outputs (and worker chunks) are deleted from the bucket after this many days."
  type        = number
  default     = 30

  validation {
    condition     = var.output_retention_days >= 1 && floor(var.output_retention_days) == var.output_retention_days
    error_message = "output_retention_days must be a whole number of days, at least 1."
  }
}
