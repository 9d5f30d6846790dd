#!/usr/bin/env bash
# README's "From boot to a ping of the floating IP", run against a running `make run` (as root: it pings
# and fetches from the namespace cloudctl-public): boots a server on `private`, gives it a floating IP
# on `public`, adds and removes ICMP and tcp/80 rules in the project's `default` group, prints each step
# and then the times (boot -> ACTIVE, boot -> DHCP lease, floating IP association -> first reply, rule
# added -> first reply, rule removed -> last reply, tcp/80 rule -> the page). Deletes what it made.
# Usage: PASSWORD=<admin password> bench/floating_ip.sh   (CLOUDCTL_API, default http://127.0.0.1:8000)
set -u
API=${CLOUDCTL_API:-http://127.0.0.1:8000}/api/v1
PASSWORD=${PASSWORD:?the admin password make run printed}
for tool in curl ping python3; do command -v $tool > /dev/null || { echo "needs $tool" >&2; exit 2; }; done
logs=$(mktemp -d); trap 'rm -rf "$logs"' EXIT
now() { date +%s.%N; }
ms() { python3 -c "import sys; print(round((float(sys.argv[2]) - float(sys.argv[1])) * 1000) if sys.argv[2] else 'none')" "$1" "${2:-}"; }
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
first_reply() { grep -m1 'bytes from' "$1" | sed 's/^\[\([0-9.]*\)\].*/\1/'; }
last_reply() { grep 'bytes from' "$1" | tail -1 | sed 's/^\[\([0-9.]*\)\].*/\1/'; }
echo '$ TOKEN=$(curl -s -X POST $API/auth/token/ ...)'
TOKEN=$(curl -s -X POST $API/auth/token/ -H 'Content-Type: application/json' \
  -d "{\"username\": \"admin\", \"password\": \"$PASSWORD\"}" | j 'd["token"]')
AUTH="Authorization: Token $TOKEN"
echo '$ curl -s -H "$AUTH" $API/networks/'
curl -s -H "$AUTH" $API/networks/ | j '[(n["name"], n["provider_type"], n["external"], n["mtu"]) for n in d]'
echo '$ curl -s -H "$AUTH" -H "Content-Type: application/json" -d {"name": "demo", "flavor": "m1.nano", "image": "tiny", "networks": [{"network": "private"}]} $API/servers/'
t_boot=$(now)
S=$(curl -s -H "$AUTH" -H 'Content-Type: application/json' \
  -d '{"name": "demo", "flavor": "m1.nano", "image": "tiny", "networks": [{"network": "private"}]}' $API/servers/ | tee $logs/s.json | j 'd["id"]')
j '(d["status"], d["addresses"])' < $logs/s.json
while :; do
  st=$(curl -s -H "$AUTH" $API/servers/$S/ | j 'd["status"]')
  [ "$st" = ACTIVE ] && break
  [ "$st" = ERROR ] && { echo "server $S: ERROR" >&2; exit 1; }
  sleep 0.5
done
t_active=$(now); echo "ACTIVE"
while ! curl -s -H "$AUTH" "$API/servers/$S/console-output/?lines=5" | j 'd["output"]' | grep -q 'cloudctl-guest: ip '; do sleep 0.5; done
t_lease=$(now)
echo '$ curl -s -H "$AUTH" "$API/servers/$S/console-output/?lines=3"'
curl -s -H "$AUTH" "$API/servers/$S/console-output/?lines=3" | j 'd["output"]'
echo '$ curl -s -H "$AUTH" -H "Content-Type: application/json" -d {"network": "public", "server": "'$S'"} $API/floating-ips/'
F=$(curl -s -H "$AUTH" -H 'Content-Type: application/json' -d "{\"network\": \"public\", \"server\": \"$S\"}" $API/floating-ips/ | tee $logs/f.json | j 'd["id"]')
FIP=$(j 'd["floating_ip_address"]' < $logs/f.json)
j '{k: d[k] for k in ("floating_ip_address", "fixed_ip_address", "status")}' < $logs/f.json
echo "\$ ip netns exec cloudctl-public ping -c 3 $FIP"
ip netns exec cloudctl-public ping -c 3 -W 1 $FIP | tail -2 | head -1
SG=$(curl -s -H "$AUTH" "$API/security-groups/?name=default" | j '[g for g in d if g["name"] == "default"][0]["id"]')
ip netns exec cloudctl-public ping -D -n -i 0.1 -W 1 -w 7 $FIP > $logs/p-rule.log 2>&1 & sleep 1
echo '$ curl -s -H "$AUTH" -H "Content-Type: application/json" -d {"security_group": "'$SG'", "direction": "ingress", "protocol": "icmp"} $API/security-group-rules/'
t_rule=$(now)
R=$(curl -s -H "$AUTH" -H 'Content-Type: application/json' -d "{\"security_group\": \"$SG\", \"direction\": \"ingress\", \"protocol\": \"icmp\"}" $API/security-group-rules/ | tee $logs/r.json | j 'd["id"]')
j '{k: d[k] for k in ("direction", "protocol", "remote_ip_prefix")}' < $logs/r.json
wait
echo "\$ ip netns exec cloudctl-public ping -c 3 $FIP"
ip netns exec cloudctl-public ping -c 3 -W 1 $FIP | grep -E 'bytes from|loss'
# association -> first reply: disassociate, then associate again while a ping runs
curl -s -X POST -H "$AUTH" $API/floating-ips/$F/disassociate/ > /dev/null; sleep 1
ip netns exec cloudctl-public ping -D -n -i 0.1 -W 1 -w 5 $FIP > $logs/p-assoc.log 2>&1 & sleep 1
echo '$ curl -s -X POST -H "$AUTH" $API/floating-ips/$F/disassociate/; ... associate/ {"server": "'$S'"}'
t_assoc=$(now)
curl -s -X POST -H "$AUTH" -H 'Content-Type: application/json' -d "{\"server\": \"$S\"}" $API/floating-ips/$F/associate/ | j '(d["status"], d["fixed_ip_address"])'
wait
echo "ttl of the replies after association: $(grep 'bytes from' $logs/p-assoc.log | grep -o 'ttl=[0-9]*' | sort | uniq -c | tr '\n' ' ')"
ip netns exec cloudctl-public ping -D -n -i 0.1 -W 1 -w 4 $FIP > $logs/p-del.log 2>&1 & sleep 1
echo '$ curl -s -X DELETE -H "$AUTH" $API/security-group-rules/'$R'/'
t_del=$(now)
curl -s -o /dev/null -w '%{http_code}\n' -X DELETE -H "$AUTH" $API/security-group-rules/$R/
wait
echo "\$ ip netns exec cloudctl-public curl -m 3 http://$FIP/"
ip netns exec cloudctl-public curl -s -m 3 http://$FIP/; echo "(curl exit $?)"
echo '$ curl ... -d {"security_group": "'$SG'", "direction": "ingress", "protocol": "tcp", "port_range_min": 80, "port_range_max": 80} $API/security-group-rules/'
t_http=$(now)
R80=$(curl -s -H "$AUTH" -H 'Content-Type: application/json' -d "{\"security_group\": \"$SG\", \"direction\": \"ingress\", \"protocol\": \"tcp\", \"port_range_min\": 80, \"port_range_max\": 80}" $API/security-group-rules/ | j 'd["id"]')
until ip netns exec cloudctl-public curl -s -m 1 http://$FIP/ > $logs/page; do :; done
t_page=$(now)
echo "\$ ip netns exec cloudctl-public curl http://$FIP/"; cat $logs/page
echo '$ curl -s -X DELETE -H "$AUTH" $API/servers/'$S'/ ; curl -s -X DELETE -H "$AUTH" $API/floating-ips/'$F'/'
curl -s -o /dev/null -w '%{http_code}\n' -X DELETE -H "$AUTH" $API/servers/$S/
curl -s -o /dev/null -w '%{http_code}\n' -X DELETE -H "$AUTH" $API/floating-ips/$F/
curl -s -o /dev/null -w '%{http_code}\n' -X DELETE -H "$AUTH" $API/security-group-rules/$R80/
echo
echo "boot POST -> ACTIVE:                     $(ms $t_boot $t_active) ms"
echo "boot POST -> lease on the console:       $(ms $t_boot $t_lease) ms"
echo "ICMP rule POST -> first reply:           $(ms $t_rule $(first_reply $logs/p-rule.log)) ms"
echo "FIP associate POST -> first reply:       $(ms $t_assoc $(first_reply $logs/p-assoc.log)) ms"
echo "rule DELETE -> last reply:               $(ms $t_del $(last_reply $logs/p-del.log)) ms"
echo "tcp/80 rule POST -> first page:          $(ms $t_http $t_page) ms"
