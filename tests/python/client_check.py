"""The official Kubernetes Python client against wharf-control: CRUD of a
ConfigMap and a Deployment, a conflict, a label-selected list, and a watch
stream that sees the changes it makes. Exits non-zero on any mismatch."""

import sys
import threading

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException


def main(kubeconfig: str) -> None:
    config.load_kube_config(config_file=kubeconfig)
    core = client.CoreV1Api()
    apps = client.AppsV1Api()
    namespace = "python"

    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    start = core.list_namespaced_config_map(namespace).metadata.resource_version

    seen = []
    done = threading.Event()

    def follow() -> None:
        stream = watch.Watch()
        for event in stream.stream(core.list_namespaced_config_map, namespace,
                                   resource_version=start, timeout_seconds=20):
            seen.append((event["type"], event["object"].metadata.name,
                         (event["object"].data or {}).get("k")))
            if event["type"] == "DELETED":
                stream.stop()
        done.set()

    watcher = threading.Thread(target=follow)
    watcher.start()

    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg", labels={"app": "py"}),
                              data={"k": "v1"})
    created = core.create_namespaced_config_map(namespace, body)
    assert created.metadata.uid, "server assigns a uid"
    read = core.read_namespaced_config_map("cfg", namespace)
    assert read.data == {"k": "v1"}, read.data

    read.data["k"] = "v2"
    replaced = core.replace_namespaced_config_map("cfg", namespace, read)
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)

    stale = created
    stale.data = {"k": "stale"}
    try:
        core.replace_namespaced_config_map("cfg", namespace, stale)
        raise AssertionError("a stale resourceVersion must conflict")
    except ApiException as error:
        assert error.status == 409, error.status

    core.patch_namespaced_config_map("cfg", namespace, {"data": {"k": "v3"}})
    listed = core.list_namespaced_config_map(namespace, label_selector="app=py")
    assert [c.metadata.name for c in listed.items] == ["cfg"]
    assert core.list_namespaced_config_map(namespace, label_selector="app=other").items == []

    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels={"app": "web"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "web"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx")]),
            ),
        ),
    )
    apps.create_namespaced_deployment(namespace, deployment)
    scale = apps.read_namespaced_deployment_scale("web", namespace)
    assert scale.spec.replicas == 2
    apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 4}})
    assert apps.read_namespaced_deployment("web", namespace).spec.replicas == 4
    apps.delete_namespaced_deployment("web", namespace)
    try:
        apps.read_namespaced_deployment("web", namespace)
        raise AssertionError("deleted deployment is still readable")
    except ApiException as error:
        assert error.status == 404, error.status

    core.delete_namespaced_config_map("cfg", namespace)
    assert done.wait(20), "watch did not see the delete"
    watcher.join()
    expected = [("ADDED", "cfg", "v1"), ("MODIFIED", "cfg", "v2"),
                ("MODIFIED", "cfg", "v3"), ("DELETED", "cfg", "v3")]
    assert seen == expected, seen
    print("python client: ok")


if __name__ == "__main__":
    main(sys.argv[1])
