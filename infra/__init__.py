"""atlasflow.infra"""
