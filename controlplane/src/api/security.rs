//! `SecurityService`: security groups and network ACLs.
