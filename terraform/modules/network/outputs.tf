output "vpc_id" {
  description = "Id of the VPC."
  value       = aws_vpc.this.id
}

output "public_subnet_ids" {
  description = "Public subnets (load balancer, NAT gateways)."
  value       = aws_subnet.public[*].id
}

output "private_subnet_ids" {
  description = "Private subnets of the EKS nodes."
  value       = aws_subnet.private[*].id
}

output "data_subnet_ids" {
  description = "Private subnets of ElastiCache (no internet route)."
  value       = aws_subnet.data[*].id
}
