output "jobs_topic" {
  value = google_pubsub_topic.jobs.name
}

output "chat_topic" {
  description = "The Worker variable PUBSUB_CHAT_TOPIC."
  value       = google_pubsub_topic.chat.name
}

output "worker_subscription" {
  value = google_pubsub_subscription.worker.name
}

output "dead_letter_subscription" {
  value = google_pubsub_subscription.dead_letter.name
}

output "outputs_bucket" {
  value = google_storage_bucket.outputs.url
}

output "input_uri_prefix" {
  description = "The Worker variable INPUT_URI_PREFIX: each API key submits input_uri files from its own folder."
  value       = "gs://${google_storage_bucket.inputs.name}/{key}/"
}

output "edge_service_account" {
  description = "Create a key for it and store it as the Worker secret GCP_SERVICE_ACCOUNT_KEY."
  value       = google_service_account.edge.email
}

output "worker_service_account" {
  value = google_service_account.worker.email
}
