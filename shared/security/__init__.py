"""The bus's security: the CA and certificates, credentials, permissions, JWTs and the kipvs credentials command."""
