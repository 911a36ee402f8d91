# cheap-serve on Google Cloud: the job queue, the job store, the output bucket, least-privilege
# service accounts, and spot GPU workers in a managed instance group that scales with the queue.

data "google_project" "this" {}

locals {
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

resource "google_project_service" "apis" {
  # Each resource below waits for the API it is made through: a new project's first apply
  # would otherwise fail with "API has not been used in project".
  for_each           = toset(["pubsub.googleapis.com", "firestore.googleapis.com", "compute.googleapis.com", "monitoring.googleapis.com", "iam.googleapis.com", "storage.googleapis.com"])
  service            = each.value
  disable_on_destroy = false
}

# --- Pub/Sub: jobs, chat, the worker subscriptions, dead letters ---------------------------

resource "google_pubsub_topic" "jobs" {
  name       = "jobs"
  depends_on = [google_project_service.apis]
}

# Queued chat messages (the edge's PUBSUB_CHAT_TOPIC). Pub/Sub delivers no more messages
# than a subscriber's flow-control limit: on the jobs subscription, a chat message would wait
# until one of the batch shards a worker holds (a `generate` shard runs for hours) ends.
resource "google_pubsub_topic" "chat" {
  name       = "chat"
  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  name       = "jobs-dead"
  depends_on = [google_project_service.apis]
}

resource "google_pubsub_subscription" "worker" {
  name                       = "worker"
  topic                      = google_pubsub_topic.jobs.id
  ack_deadline_seconds       = var.ack_deadline_seconds
  message_retention_duration = "604800s" # 7 days: a queue outlives a long outage
  retain_acked_messages      = false

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  # The last resort: the worker quarantines a shard after `poison_limit` deliveries that
  # stopped a worker (preemptions do not count), or twice as many that ended in an error it
  # lived through (storage or Firestore failing), and publishes it to the dead-letter topic
  # itself. Pub/Sub's own count includes preemptions, so its limit is set well above.
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = "" # never expires
  }

  lifecycle {
    precondition {
      condition     = var.max_delivery_attempts > 2 * var.poison_limit
      error_message = "max_delivery_attempts must be above 2 x poison_limit, so that the worker quarantines a shard (and fails its job with the reason) before Pub/Sub gives up on it."
    }
  }
}

# The workers pull chat messages here beside their jobs subscription, with flow control of
# their own (CHAT_SUBSCRIPTION, CHAT_MAX_OUTSTANDING_MESSAGES).
resource "google_pubsub_subscription" "worker_chat" {
  name                       = "worker-chat"
  topic                      = google_pubsub_topic.chat.id
  ack_deadline_seconds       = var.ack_deadline_seconds
  message_retention_duration = "604800s"
  retain_acked_messages      = false

  # Someone waits for each reply: retry sooner than the jobs subscription does.
  retry_policy {
    minimum_backoff = "1s"
    maximum_backoff = "60s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = ""
  }
}

# Dead letters are kept for inspection and replay.
resource "google_pubsub_subscription" "dead_letter" {
  name                       = "jobs-dead-sub"
  topic                      = google_pubsub_topic.dead_letter.id
  message_retention_duration = "604800s"
  expiration_policy {
    ttl = ""
  }
}

# The workers' own subscription on the dead-letter topic: a shard that Pub/Sub itself gave up
# on (its limit counts preemptions and the retries of an outage) goes back on the jobs topic
# while its job is running; quarantined shards, already failed, are left alone.
resource "google_pubsub_subscription" "dead_letter_watch" {
  name                       = "jobs-dead-watch"
  topic                      = google_pubsub_topic.dead_letter.id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  retain_acked_messages      = false

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  expiration_policy {
    ttl = ""
  }
}

# Pub/Sub's service agent forwards dead letters: it publishes to the dead-letter topic and
# acknowledges on the source subscription.
resource "google_pubsub_topic_iam_member" "agent_publishes_dead_letters" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "agent_acks_source" {
  subscription = google_pubsub_subscription.worker.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "agent_acks_chat_source" {
  subscription = google_pubsub_subscription.worker_chat.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# --- Firestore: job records, shard checkpoints, idempotency keys ---------------------------

resource "google_firestore_database" "default" {
  name        = "(default)"
  location_id = var.region
  type        = "FIRESTORE_NATIVE"
  depends_on  = [google_project_service.apis]
}

# Finished job records and idempotency keys are deleted after their `expire_at`.
resource "google_firestore_field" "jobs_ttl" {
  database   = google_firestore_database.default.name
  collection = "jobs"
  field      = "expire_at"
  ttl_config {}
}

resource "google_firestore_field" "idempotency_ttl" {
  database   = google_firestore_database.default.name
  collection = "idempotency"
  field      = "expire_at"
  ttl_config {}
}

# --- Object storage for outputs ------------------------------------------------------------

resource "google_storage_bucket" "outputs" {
  depends_on = [google_project_service.apis]

  name                        = "${var.project}-${var.name}-outputs"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  lifecycle_rule {
    condition {
      age = var.output_retention_days
    }
    action {
      type = "Delete"
    }
  }
}

# Input files of `input_uri` jobs, one folder per API key: the edge's INPUT_URI_PREFIX (output
# `input_uri_prefix`) lets each key submit only the files in its own folder.
resource "google_storage_bucket" "inputs" {
  depends_on = [google_project_service.apis]

  name                        = "${var.project}-${var.name}-inputs"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  lifecycle_rule {
    condition {
      age = var.input_retention_days
    }
    action {
      type = "Delete"
    }
  }
}

# --- Service accounts with least privilege -------------------------------------------------

resource "google_service_account" "edge" {
  depends_on = [google_project_service.apis]

  account_id   = "${var.name}-edge"
  display_name = "cheap-serve edge (Cloudflare Worker / Lambda)"
}

resource "google_service_account" "worker" {
  depends_on = [google_project_service.apis]

  account_id   = "${var.name}-worker"
  display_name = "cheap-serve batch worker"
}

# Edge: publish to the jobs and chat topics only; read and write documents (job records, idempotency
# keys). Firestore has no per-collection IAM: datastore.user is the narrowest role that
# reads and writes documents.
resource "google_pubsub_topic_iam_member" "edge_publishes_jobs" {
  topic  = google_pubsub_topic.jobs.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.edge.email}"
}

resource "google_pubsub_topic_iam_member" "edge_publishes_chat" {
  topic  = google_pubsub_topic.chat.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.edge.email}"
}

resource "google_project_iam_member" "edge_firestore" {
  project = var.project
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.edge.email}"
}

# Worker: pull from its subscriptions (jobs, chat) and its dead-letter watch, publish quarantined shards to
# the dead-letter topic, the shards of input files (and requeued dead letters) to the jobs
# topic and requeued chat messages to the chat topic, job records and checkpoints, objects of
# the output bucket, logs and metrics.
resource "google_pubsub_subscription_iam_member" "worker_subscribes" {
  subscription = google_pubsub_subscription.worker.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_pubsub_subscription_iam_member" "worker_subscribes_chat" {
  subscription = google_pubsub_subscription.worker_chat.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.worker.email}"
}

# The worker that takes an input-file job publishes its shards to the jobs topic.
resource "google_pubsub_topic_iam_member" "worker_publishes_shards" {
  topic  = google_pubsub_topic.jobs.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.worker.email}"
}

# The dead-letter watch puts the chat messages Pub/Sub dead-lettered back on the chat topic.
resource "google_pubsub_topic_iam_member" "worker_requeues_chat" {
  topic  = google_pubsub_topic.chat.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_pubsub_subscription_iam_member" "worker_watches_dead_letters" {
  subscription = google_pubsub_subscription.dead_letter_watch.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_pubsub_topic_iam_member" "worker_dead_letters" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_project_iam_member" "worker_firestore" {
  project = var.project
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_storage_bucket_iam_member" "worker_outputs" {
  bucket = google_storage_bucket.outputs.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_storage_bucket_iam_member" "worker_reads_inputs" {
  bucket = google_storage_bucket.inputs.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.worker.email}"
}

# The release, ONNX Runtime and model tarballs that are in a bucket (gs://): the startup script
# downloads them as the worker's account, which nothing else lets read them.
resource "google_storage_bucket_iam_member" "worker_reads_releases" {
  for_each = toset([for u in [var.worker_url, var.ort_url, var.lm_url] : split("/", trimprefix(u, "gs://"))[0] if startswith(u, "gs://")])
  bucket   = each.value
  role     = "roles/storage.objectViewer"
  member   = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_project_iam_member" "worker_logs" {
  for_each = toset(["roles/logging.logWriter", "roles/monitoring.metricWriter"])
  project  = var.project
  role     = each.value
  member   = "serviceAccount:${google_service_account.worker.email}"
}

# --- Spot GPU workers ----------------------------------------------------------------------

resource "google_compute_instance_template" "worker" {
  depends_on = [google_project_service.apis]

  name_prefix  = "${var.name}-worker-"
  machine_type = var.machine_type
  region       = var.region

  guest_accelerator {
    type  = var.gpu_type
    count = var.gpu_count
  }

  scheduling {
    provisioning_model          = "SPOT"
    preemptible                 = true
    automatic_restart           = false
    on_host_maintenance         = "TERMINATE" # required with GPUs
    instance_termination_action = "STOP"      # the group's repair recreates it when it can
  }

  disk {
    source_image = var.worker_image
    disk_size_gb = 100
    disk_type    = "pd-balanced"
    boot         = true
    auto_delete  = true
  }

  network_interface {
    network = "default"
    access_config {}
  }

  service_account {
    email  = google_service_account.worker.email
    scopes = ["cloud-platform"]
  }

  metadata = {
    startup-script        = file("${path.module}/../startup.sh")
    shutdown-script       = file("${path.module}/../shutdown.sh")
    install-nvidia-driver = "True"
    worker-version        = var.worker_version
    worker-url            = var.worker_url
    worker-sha256         = var.worker_sha256
    ort-url               = var.ort_url
    ort-sha256            = var.ort_sha256
    lm-url                = var.lm_url
    lm-sha256             = var.lm_sha256
    pubsub-subscription   = google_pubsub_subscription.worker.name
    chat-subscription     = google_pubsub_subscription.worker_chat.name
    chat-topic            = google_pubsub_topic.chat.name
    dead-letter-topic     = google_pubsub_topic.dead_letter.name
    dead-letter-watch     = google_pubsub_subscription.dead_letter_watch.name
    jobs-topic            = google_pubsub_topic.jobs.name
    output-root           = "gs://${google_storage_bucket.outputs.name}"
    poison-limit          = tostring(var.poison_limit)
    device                = "auto"
  }

  lifecycle {
    create_before_destroy = true
    precondition {
      condition     = var.lm_url == "" || var.lm_sha256 != ""
      error_message = "lm_sha256 is required with lm_url: the startup script installs only a bundle whose sha256 it can check."
    }
  }
}

resource "google_compute_instance_group_manager" "workers" {
  depends_on = [google_project_service.apis]

  name               = "${var.name}-workers"
  zone               = var.zone
  base_instance_name = "${var.name}-worker"

  version {
    instance_template = google_compute_instance_template.worker.id
  }

  # Rolling out a new worker version replaces VMs one at a time; a replaced VM drains first.
  update_policy {
    type                  = "PROACTIVE"
    minimal_action        = "REPLACE"
    max_surge_fixed       = 0
    max_unavailable_fixed = 1
  }
}

# Scale with the backlog: one worker per `undelivered_per_worker` undelivered shard messages
# (or chat messages: the autoscaler follows whichever signal asks for more VMs), down to zero
# VMs when both queues are empty (allowed because the metrics are per-group Pub/Sub metrics
# with single_instance_assignment; utilization-based policies cannot go to 0).
resource "google_compute_autoscaler" "workers" {
  name   = "${var.name}-workers"
  zone   = var.zone
  target = google_compute_instance_group_manager.workers.id

  autoscaling_policy {
    min_replicas    = 0
    max_replicas    = var.max_workers
    cooldown_period = 180

    metric {
      name                       = "pubsub.googleapis.com/subscription/num_undelivered_messages"
      filter                     = "resource.type = pubsub_subscription AND resource.labels.subscription_id = \"${google_pubsub_subscription.worker.name}\""
      single_instance_assignment = var.undelivered_per_worker
    }

    metric {
      name                       = "pubsub.googleapis.com/subscription/num_undelivered_messages"
      filter                     = "resource.type = pubsub_subscription AND resource.labels.subscription_id = \"${google_pubsub_subscription.worker_chat.name}\""
      single_instance_assignment = var.undelivered_per_worker
    }
  }
}
