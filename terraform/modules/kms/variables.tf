variable "name" {
  description = "Name of the deployment (alias/<name>)."
  type        = string
}
